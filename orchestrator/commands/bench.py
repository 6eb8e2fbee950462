"""`pdserve bench`: replay a real trace against an OpenAI-compatible endpoint.

Requests arrive at the trace's times (scaled by ``--rate-scale``) with the
trace's prompt and output lengths (clipped for small models), prompts sent as
token ids through ``/v1/completions``. Prints TTFT/TPOT/e2e percentiles, SLO
attainment and errors by status; with ``--out DIR`` writes ``bench.json``
(config, summary, one row per request) and ``bench_cdf.png``.
"""

from __future__ import annotations

import argparse
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register `pdserve bench` options."""
    parser.add_argument("--trace", required=True,
                        help="trace file (Azure 2023 CSV, Mooncake JSONL, BurstGPT CSV) or a shipped name "
                             "such as azure-conv")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="base URL of the OpenAI endpoint")
    parser.add_argument("--api-key", default=os.environ.get("PDSERVE_API_KEY"),
                        help="bearer token (default: $PDSERVE_API_KEY)")
    parser.add_argument("--model", default=None, help="model name (default: the first one /v1/models lists)")
    parser.add_argument("--rate-scale", type=float, default=1.0,
                        help="arrival-rate multiplier: 2 sends the trace twice as fast")
    parser.add_argument("--start-s", type=float, default=0.0, help="skip the trace's first START_S seconds")
    parser.add_argument("--limit", type=int, default=None, help="send at most this many requests")
    parser.add_argument("--max-prompt-tokens", type=int, default=None, help="clip prompt lengths to this")
    parser.add_argument("--max-output-tokens", type=int, default=None, help="clip output lengths to this")
    parser.add_argument("--ttft-slo", type=float, default=None, help="TTFT target in seconds, for attainment")
    parser.add_argument("--tpot-slo", type=float, default=None, help="TPOT target in seconds, for attainment")
    parser.add_argument("--slo-class", default=None, help="SLO class sent as header x-pdserve-slo-class")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds one request may take before it counts as a timeout")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic prompts")
    parser.add_argument("--token-id-range", type=int, nargs=2, default=(1000, 10000), metavar=("LOW", "HIGH"),
                        help="prompt token ids are drawn from [LOW, HIGH); must lie inside the model's vocabulary")
    parser.add_argument("--no-ignore-eos", action="store_true",
                        help="let the model stop at EOS instead of generating the trace's output length")
    parser.add_argument("--out", default=None, help="directory for bench.json and bench_cdf.png")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    """Run the benchmark; 0 when at least one request succeeded."""
    import asyncio
    import json
    import sys
    from pathlib import Path

    from tqdm import tqdm

    from orchestrator.runtime.bench.plot import plot_cdfs
    from orchestrator.runtime.bench.report import format_report, report_json, slo_target, summarize
    from orchestrator.runtime.bench.runner import Endpoint, discover_model, run_requests
    from orchestrator.runtime.bench.workload import WorkloadOptions, plan_requests
    from simulations.traces import load_trace

    try:
        slo_target(args.ttft_slo, args.tpot_slo)  # checked before the run, which may take hours
        trace = load_trace(args.trace)
        model, context_tokens = discover_model(args.url, args.api_key)
        options = WorkloadOptions(
            rate_scale=args.rate_scale, start_s=args.start_s, limit=args.limit,
            max_prompt_tokens=args.max_prompt_tokens, max_output_tokens=args.max_output_tokens,
            context_tokens=context_tokens, seed=args.seed,
            id_low=args.token_id_range[0], id_high=args.token_id_range[1],
        )
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"pdserve bench: {exc}", file=sys.stderr)
        return 2
    model = args.model or model
    requests = plan_requests(
        trace.arrival_s.tolist(), trace.prompt_tokens.tolist(), trace.output_tokens.tolist(), options
    )
    if not requests:
        print("pdserve bench: no requests to send (check --start-s and --limit)", file=sys.stderr)
        return 2
    span_s = requests[-1].send_at_s
    print(f"trace {trace.name}: sending {len(requests)} requests over {span_s:.1f} s to {args.url} ({model})")
    endpoint = Endpoint(args.url, model, args.api_key, timeout_s=args.timeout, ignore_eos=not args.no_ignore_eos,
                        slo_class=args.slo_class)
    with tqdm(total=len(requests), unit="req", disable=args.no_progress) as bar:
        results = asyncio.run(run_requests(endpoint, requests, options, on_result=lambda _: bar.update()))
    report = summarize(results, args.ttft_slo, args.tpot_slo)
    print(format_report(report))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        config = {
            "trace": str(args.trace), "url": args.url, "model": model, "rate_scale": args.rate_scale,
            "start_s": args.start_s, "limit": args.limit, "max_prompt_tokens": args.max_prompt_tokens,
            "max_output_tokens": args.max_output_tokens, "context_tokens": context_tokens, "seed": args.seed,
            "ignore_eos": endpoint.ignore_eos, "timeout_s": args.timeout, "slo_class": args.slo_class,
        }
        (out / "bench.json").write_text(json.dumps(report_json(report, results, config), indent=2))
        plot_cdfs(results, out / "bench_cdf.png", args.ttft_slo, args.tpot_slo, title=f"{trace.name} -> {model}")
        print(f"wrote {out / 'bench.json'} and {out / 'bench_cdf.png'}")
    return 0 if report.num_ok > 0 else 1
