"""`pdserve quickstart`: the main job on the embedded default, start to finish.

Starts the embedded system (local Ray, tiny model, one prefill and one decode
worker, controller, router, HTTP), replays a short slice of the real Azure
2023 conversation trace against it with ``pdserve bench``'s code (lengths
clipped for the tiny CPU model, arrivals rate-scaled), prints the latency and
SLO report, and stops everything it started.
"""

from __future__ import annotations

import argparse
import math

from orchestrator.commands.device_flag import add_device_argument, device_problem
from orchestrator.commands.kv_flags import add_kv_arguments, kv_flags_problem

CONTEXT_TOKENS = 2048  # the front end's default window; longer trace requests are clipped to it


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register `pdserve quickstart` options."""
    parser.add_argument("--trace", default="azure-conv", help="trace name or file (default azure-conv)")
    parser.add_argument("--requests", type=int, default=40, help="requests to replay (default 40)")
    parser.add_argument("--rate-scale", type=float, default=1.0, help="arrival-rate multiplier (default 1)")
    parser.add_argument("--max-prompt-tokens", type=int, default=512, help="clip prompts to this (default 512)")
    parser.add_argument("--max-output-tokens", type=int, default=32, help="clip outputs to this (default 32)")
    parser.add_argument("--ttft-slo", type=float, default=2.0, help="TTFT target in seconds (default 2.0)")
    parser.add_argument("--tpot-slo", type=float, default=0.2, help="TPOT target in seconds (default 0.2)")
    parser.add_argument("--prefill", type=int, default=1, help="prefill workers (default 1)")
    parser.add_argument("--decode", type=int, default=1, help="decode workers (default 1)")
    add_kv_arguments(parser)
    add_device_argument(parser)
    parser.add_argument("--cache-dir", default=None, help="where the tiny model is created once")
    parser.add_argument("--out", default=None, help="also write bench.json and bench_cdf.png here")


def _validate(args: argparse.Namespace) -> str | None:
    if args.requests < 1 or args.rate_scale <= 0:
        return "--requests must be >= 1 and --rate-scale > 0"
    if args.prefill < 0 or args.decode < 1:
        return "--prefill must be >= 0 and --decode >= 1"
    for flag, value in (("--max-prompt-tokens", args.max_prompt_tokens), ("--max-output-tokens", args.max_output_tokens)):
        if value < 1:
            return f"{flag} must be >= 1, got {value}"
    for flag, value in (("--ttft-slo", args.ttft_slo), ("--tpot-slo", args.tpot_slo)):
        if not (math.isfinite(value) and value > 0):
            return f"{flag} must be a positive number of seconds, got {value}"
    return kv_flags_problem(args) or device_problem(args)


def main(args: argparse.Namespace) -> int:
    """Start, replay, report, stop; 0 when every request succeeded."""
    import asyncio
    import json
    import sys
    import time
    from pathlib import Path

    from orchestrator.runtime.bench.plot import plot_cdfs
    from orchestrator.runtime.bench.report import format_report, report_json, summarize
    from orchestrator.runtime.bench.runner import Endpoint, run_requests
    from orchestrator.runtime.bench.workload import WorkloadOptions, plan_requests
    from orchestrator.runtime.embedded import start_embedded
    from simulations.traces import load_trace

    problem = _validate(args)
    if problem is not None:
        print(f"pdserve quickstart: {problem}", file=sys.stderr)
        return 2
    try:
        trace = load_trace(args.trace)
        options = WorkloadOptions(
            rate_scale=args.rate_scale, limit=args.requests, max_prompt_tokens=args.max_prompt_tokens,
            max_output_tokens=args.max_output_tokens, context_tokens=CONTEXT_TOKENS,
        )
    except (OSError, ValueError) as exc:
        print(f"pdserve quickstart: {exc}", file=sys.stderr)
        return 2
    started = time.monotonic()
    print(f"starting pdserve: {args.prefill} prefill + {args.decode} decode workers on a local Ray ...", flush=True)
    try:
        handle = start_embedded(
            num_prefill=args.prefill, num_decode=args.decode, cache_dir=args.cache_dir, transport=args.transport,
            kv_poll_us=args.kv_poll_us, kv_tcp_congestion=args.kv_tcp_congestion, device=args.device,
        )
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"pdserve quickstart: {exc}", file=sys.stderr)
        return 1
    try:
        print(f"serving {handle.model_dir.name} at {handle.url}/v1 (up in {time.monotonic() - started:.0f} s)")
        requests = plan_requests(
            trace.arrival_s.tolist(), trace.prompt_tokens.tolist(), trace.output_tokens.tolist(), options
        )
        span_s = requests[-1].send_at_s if requests else 0.0
        print(f"replaying {len(requests)} requests of {trace.name} over {span_s:.1f} s "
              f"(prompts <= {args.max_prompt_tokens}, outputs <= {args.max_output_tokens} tokens) ...", flush=True)
        endpoint = Endpoint(handle.url, handle.model_dir.name, timeout_s=300.0)
        results = asyncio.run(run_requests(endpoint, requests, options))
        report = summarize(results, args.ttft_slo, args.tpot_slo)
        print(format_report(report))
        print(f"router hand-overs: {handle.backend.handovers}, KV back-pressure waits: {handle.backend.busy_retries}")
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            config = {"trace": args.trace, "requests": args.requests, "rate_scale": args.rate_scale,
                      "max_prompt_tokens": args.max_prompt_tokens, "max_output_tokens": args.max_output_tokens}
            (out / "bench.json").write_text(json.dumps(report_json(report, results, config), indent=2))
            plot_cdfs(results, out / "bench_cdf.png", args.ttft_slo, args.tpot_slo,
                      title=f"quickstart: {trace.name} -> {handle.model_dir.name}")
            print(f"wrote {out / 'bench.json'} and {out / 'bench_cdf.png'}")
    finally:
        handle.stop()
    print(f"done in {time.monotonic() - started:.0f} s")
    return 0 if report.num_ok == report.num_requests else 1
