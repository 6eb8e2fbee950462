"""`pdserve simulate`: replay one trace against one simulated cluster.

Writes to ``--out``: ``summary.json`` (deterministic for a seed),
``requests.csv`` (one row per request), ``instances.csv``, and the plots
``latency_cdf.png`` and ``utilisation.png``.
"""

from __future__ import annotations

import argparse
import sys

from simulations.commands.common import add_cluster_arguments, add_workload_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `pdserve simulate`."""
    add_workload_arguments(parser)
    parser.add_argument("--setup", choices=("colocated", "disagg"), default="disagg",
                        help="colocated instances, or static prefill/decode disaggregation")
    parser.add_argument("--prefill", type=int, default=1, help="prefill instances (disagg)")
    parser.add_argument("--decode", type=int, default=1, help="decode instances (disagg)")
    parser.add_argument("--colocated", type=int, default=2, help="colocated instances (colocated)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel degree of every instance")
    parser.add_argument("--prefill-tp", type=int, default=None, help="TP of prefill instances (default --tp)")
    parser.add_argument("--decode-tp", type=int, default=None, help="TP of decode instances (default --tp)")
    parser.add_argument("--rate-scale", type=float, default=1.0, help="multiply the trace's arrival rate")
    parser.add_argument("--out", default="runs/simulate", help="output directory")
    parser.add_argument("--no-requests-csv", action="store_true", help="skip the per-request CSV")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    add_cluster_arguments(parser)


def main(args: argparse.Namespace) -> int:
    """Run one simulation and write its outputs."""
    import os
    import time

    from simulations.commands.common import at_least, knobs_from_args, latency_from_args
    from simulations.experiments.specs import Placement, build_cluster, load_workload, slo_target
    from simulations.sim.cluster import ClusterSim
    from simulations.sim.results import collect, format_s

    try:
        slo = slo_target(args.ttft_slo, args.tpot_slo, args.attainment)
        knobs = knobs_from_args(args)
        counts = ((("--colocated", args.colocated),) if args.setup == "colocated"
                  else (("--prefill", args.prefill), ("--decode", args.decode)))
        for flag, value in (("--tp", args.tp), ("--prefill-tp", args.prefill_tp), ("--decode-tp", args.decode_tp),
                            *counts):
            at_least(flag, value, 1)
        latency = latency_from_args(args)
        trace = load_workload(args.trace, args.limit, args.rate_scale, args.sample, args.seed)
        if args.setup == "colocated":
            placement = Placement(colocated=args.colocated, colocated_tp=args.tp)
        else:
            placement = Placement(prefill=args.prefill, prefill_tp=args.prefill_tp or args.tp,
                                  decode=args.decode, decode_tp=args.decode_tp or args.tp)
        bucket_s = max(1e-3, trace.duration_s / 200)
        config = build_cluster(placement, latency, knobs, timeline_bucket_s=bucket_s)
        sim = ClusterSim(trace, latency.model, config)  # validates every instance's spec
    except (ValueError, FileNotFoundError) as exc:
        print(f"pdserve simulate: {exc}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    sim.run()
    wall_s = time.perf_counter() - t0
    result = collect(sim, slo)
    result.summary["latency"] = latency.spec
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as fh:
        fh.write(result.to_json() + "\n")
    with open(os.path.join(args.out, "instances.csv"), "w", encoding="utf-8") as fh:
        fh.write("id,role,node,tp,busy_fraction,prefill_tokens,decode_tokens,preemptions\n")
        for row in result.summary["instances"]:
            fh.write(f"{row['id']},{row['role']},{row['node']},{row['tp']},{row['busy_fraction']:.4f},"
                     f"{row['prefill_tokens']},{row['decode_tokens']},{row['preemptions']}\n")
    if not args.no_requests_csv:
        result.write_requests_csv(os.path.join(args.out, "requests.csv"))
    if not args.no_plots:
        from simulations.experiments.plots import plot_latency_cdfs, plot_utilisation

        plot_latency_cdfs({config.label: result}, os.path.join(args.out, "latency_cdf.png"), slo)
        plot_utilisation(result, os.path.join(args.out, "utilisation.png"))
    s = result.summary
    print(f"{config.label} on {trace.name} ({len(trace)} requests, {latency.spec}): "
          f"{s['finished']} finished, {s['rejected']} rejected, {s['preemptions']} preemptions")
    ttft, tpot = s["ttft_s"], s["tpot_s"]
    print(f"TTFT p50/p90/p99 {'/'.join(format_s(ttft[q]) for q in ('p50', 'p90', 'p99'))} s; "
          f"TPOT p50/p90/p99 {'/'.join(format_s(tpot[q], 4) for q in ('p50', 'p90', 'p99'))} s; "
          f"TBT worst-10% mean {format_s(s['tbt_s']['worst10_mean'], 4)} s")
    print(f"SLO attainment (TTFT<={slo.ttft_s:g}s, TPOT<={slo.tpot_s:g}s): {s['slo']['attainment']:.3f}")
    print(f"simulated {len(trace)} requests in {wall_s:.2f} s ({len(trace) / max(wall_s, 1e-9):,.0f} req/s); "
          f"outputs in {args.out}")
    return 0
