"""`pdserve goodput`: DistServe's placement search — per-GPU goodput of every split of a GPU budget.

For each placement (colocated baseline with all GPUs; every prefill/decode
count and TP degree within the budget) the highest rate meeting the SLO at
the target attainment is found by bisection. Writes ``goodput.json``,
``goodput.csv``, ``goodput_per_gpu.png``, ``attainment_vs_rate.png`` and
``latency_cdf.png`` (best colocated vs best disaggregated, each at its own
goodput rate) to ``--out`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys

from simulations.commands.common import add_cluster_arguments, add_workload_arguments

# Rows a search replays when neither --limit nor --sample says: every probe re-runs the trace.
DEFAULT_LIMIT = 2000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `pdserve goodput`."""
    add_workload_arguments(parser, default_limit=DEFAULT_LIMIT)
    parser.add_argument("--gpus", type=int, default=4, help="GPU budget of the placement search")
    parser.add_argument("--tp", default="1,2", help="comma-separated TP degrees to consider")
    parser.add_argument("--setups", default="colocated,disagg", help="comma-separated: colocated, disagg")
    parser.add_argument("--tolerance", type=float, default=0.04, help="relative precision of the rate bisection")
    parser.add_argument("--out", default="runs/goodput", help="output directory")
    add_cluster_arguments(parser)


def _table(rows: list[dict[str, object]]) -> str:
    lines = ["| placement | GPUs | goodput (req/s) | per-GPU goodput (req/s) |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['placement']} | {r['gpus']} | {r['goodput_rps']:.2f} | {r['per_gpu_rps']:.3f} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Run the placement search and write its outputs."""
    import json
    import os

    from tqdm import tqdm

    from simulations.commands.common import knobs_from_args, latency_from_args, workload_limit
    from simulations.experiments.goodput import placement_goodput, placements, run_at_rate, trace_rate_rps
    from simulations.experiments.plots import plot_attainment_vs_rate, plot_goodput_bars, plot_latency_cdfs
    from simulations.experiments.specs import load_workload, slo_target

    try:
        slo = slo_target(args.ttft_slo, args.tpot_slo, args.attainment)
        latency = latency_from_args(args)
        trace = load_workload(args.trace, workload_limit(args, DEFAULT_LIMIT), 1.0, args.sample, args.seed)
        setups = {s.strip() for s in args.setups.split(",") if s.strip()}
        if not setups <= {"colocated", "disagg"} or not setups:
            raise ValueError(f"--setups must list colocated and/or disagg, got {args.setups!r}")
        try:
            tps = [int(t) for t in args.tp.split(",") if t.strip()]
        except ValueError:
            raise ValueError(f"--tp must be comma-separated integers, got {args.tp!r}") from None
        if args.gpus < 1:
            raise ValueError("--gpus must be >= 1")
        if not 0 < args.tolerance < 1:
            raise ValueError(f"--tolerance must be in (0, 1), got {args.tolerance:g}")
        if not tps or any(tp < 1 for tp in tps):
            raise ValueError(f"--tp degrees must be >= 1, got {args.tp!r}")
        trace_rate_rps(trace)  # the search scales the trace's own rate, so it must have one
        knobs = knobs_from_args(args)
        candidates = placements(args.gpus, tps, latency, "colocated" in setups, "disagg" in setups)
        if not candidates:
            raise ValueError(f"no placement of {latency.spec} fits {args.gpus} GPUs with TP in {tps}")
    except (ValueError, FileNotFoundError) as exc:
        print(f"pdserve goodput: {exc}", file=sys.stderr)
        return 2
    results = []
    with tqdm(total=len(candidates), unit="placement", file=sys.stderr) as bar:
        def on_probe(placement, rate, attained):  # type: ignore[no-untyped-def]
            bar.set_postfix_str(f"{placement.label} @ {rate:.2f} rps: {attained:.2f}")

        for placement in candidates:
            results.append(placement_goodput(trace, latency, placement, knobs, slo, args.tolerance, on_probe))
            bar.update(1)
    results.sort(key=lambda g: g.per_gpu_rps, reverse=True)
    rows = [{"placement": g.placement.label, "gpus": g.placement.num_gpus, "colocated": g.placement.is_colocated,
             "goodput_rps": g.search.goodput_rps, "per_gpu_rps": g.per_gpu_rps, "saturated": g.search.saturated,
             "points": [[p.rate_rps, p.attainment] for p in g.search.points]} for g in results]
    os.makedirs(args.out, exist_ok=True)
    doc = {"trace": trace.name, "requests": len(trace), "latency": latency.spec, "gpu_budget": args.gpus,
           "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s, "attainment": slo.attainment}, "placements": rows}
    with open(os.path.join(args.out, "goodput.json"), "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=2, sort_keys=True)
    with open(os.path.join(args.out, "goodput.csv"), "w", encoding="utf-8") as fh:
        fh.write("placement,gpus,colocated,goodput_rps,per_gpu_rps,saturated\n")
        for r in rows:
            fh.write(f"{r['placement']},{r['gpus']},{r['colocated']},{r['goodput_rps']:.4f},"
                     f"{r['per_gpu_rps']:.4f},{r['saturated']}\n")
    plot_goodput_bars(results, os.path.join(args.out, "goodput_per_gpu.png"))
    best = [g for g in (next((g for g in results if g.placement.is_colocated), None),
                        next((g for g in results if not g.placement.is_colocated), None)) if g is not None]
    plot_attainment_vs_rate(results[:6] + [g for g in best if g not in results[:6]],
                            os.path.join(args.out, "attainment_vs_rate.png"), slo.attainment)
    cdf_runs = {}
    for g in best:
        if g.search.goodput_rps > 0:
            res = run_at_rate(trace, g.search.goodput_rps, latency, g.placement, knobs, slo)
            cdf_runs[f"{g.placement.label} @ {g.search.goodput_rps:.2f} rps"] = res
    if cdf_runs:
        plot_latency_cdfs(cdf_runs, os.path.join(args.out, "latency_cdf.png"), slo)
    print(f"per-GPU goodput on {trace.name} ({len(trace)} requests), {latency.spec}, "
          f"SLO TTFT<={slo.ttft_s:g}s TPOT<={slo.tpot_s:g}s at {slo.attainment:.0%}:")
    print(_table(rows))
    print(f"outputs in {args.out}")
    return 0
