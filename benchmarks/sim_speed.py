"""Simulator speed: simulated requests per wall-second on the Azure conversation trace.

The trace is tiled to N requests and its rate scaled (default 5x: ~28 req/s,
a busy but stable load for 8 prefill + 8 decode A100s running Llama-2-13B
under the roofline model). Prints, per size, wall time, requests/s,
simulated output tokens/s and events, the per-request time relative to the
smallest size (linear growth keeps it near 1.0; from CPU time, which a
shared machine distorts less than wall time), peak RSS, and — as the
same-run baselines — the speed-up of step-batched decode runs over costing
every decode step as its own event, of a router view refreshed every
``--router-refresh-s`` (the live router's 0.2 s by default) over one rebuilt
on every arrival (0), and, when the compiled simulator is built
(``python -m simulations.native build``), its speed-up over the pure Python
modules (run in a subprocess with ``PDSERVE_SIM_PURE=1``).

    python benchmarks/sim_speed.py                 # 100k, 300k, 1M requests
    python benchmarks/sim_speed.py --requests 50000
    python benchmarks/sim_speed.py --router-refresh-s 0   # the router sees every load change at once
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import simulations.sim  # noqa: E402
from simulations.experiments.specs import ClusterKnobs, Placement, build_cluster, load_latency  # noqa: E402
from simulations.sim.cluster import ClusterConfig, ClusterSim  # noqa: E402
from simulations.traces import load_trace, scale_rate, tile  # noqa: E402
from simulations.traces.trace import Trace  # noqa: E402

TRACE = "/work/shared/traces/azure_llm_2023/AzureLLMInferenceTrace_conv.csv"
TARGET_REQ_PER_S = 20_000  # simulated requests per wall-second at 1M requests (product requirement)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _run(trace: Trace, config: ClusterConfig, latency_spec: str) -> tuple[float, float, int, int]:
    """(wall seconds, CPU seconds, events, output tokens generated) of one full run."""
    latency = load_latency(latency_spec)
    sim = ClusterSim(trace, latency.model, config)
    t0 = time.perf_counter()
    c0 = time.process_time()
    sim.run()
    cpu_s = time.process_time() - c0
    wall_s = time.perf_counter() - t0
    tokens = sum(i.decode_tokens_done for i in sim.instances) + sim.recorder.status.count(1)
    return wall_s, cpu_s, sim.loop.events_run, tokens


def _reference_loop_cpu_s() -> float:
    """CPU seconds of a fixed pure-Python loop: how fast this machine runs Python right now."""
    c0 = time.process_time()
    total = 0
    for i in range(10_000_000):
        total += i
    return time.process_time() - c0


def _pure_cpu_s(args: argparse.Namespace, n: int) -> float:
    """CPU seconds of one ``n``-request run by the pure-Python simulator, in a fresh process."""
    env = dict(os.environ, PDSERVE_SIM_PURE="1")
    cmd = [sys.executable, __file__, "--cpu-only", str(n), "--rate-scale", str(args.rate_scale),
           "--prefill", str(args.prefill), "--decode", str(args.decode), "--latency", args.latency,
           "--router-refresh-s", str(args.router_refresh_s)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return float(done.stdout.split()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=None, help="one run of N requests instead of 100k/300k/1M")
    parser.add_argument("--rate-scale", type=float, default=5.0, help="multiply the trace's arrival rate")
    parser.add_argument("--prefill", type=int, default=8)
    parser.add_argument("--decode", type=int, default=8)
    parser.add_argument("--latency", default="roofline:a100-80gb:llama-2-13b")
    parser.add_argument("--router-refresh-s", type=float, default=ClusterKnobs().router_refresh_s,
                        help="how often the router's view is rebuilt (0: on every arrival)")
    parser.add_argument("--baseline-requests", type=int, default=20_000,
                        help="size of the decode-runs vs single-steps comparison (0 to skip)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per size (median reported)")
    parser.add_argument("--cpu-only", type=int, default=0, help=argparse.SUPPRESS)  # the pure-Python baseline run
    args = parser.parse_args()

    base = load_trace(TRACE if Path(TRACE).exists() else "azure-conv")
    latency = load_latency(args.latency)
    config = build_cluster(Placement(prefill=args.prefill, decode=args.decode), latency,
                           ClusterKnobs(router_refresh_s=args.router_refresh_s), timeline_bucket_s=60.0)
    if args.cpu_only:
        print(_run(scale_rate(tile(base, args.cpu_only), args.rate_scale), config, args.latency)[1])
        return 0
    sizes = [args.requests] if args.requests else [100_000, 300_000, 1_000_000]
    print(f"trace {base.name} ({len(base)} rows) tiled, rate x{args.rate_scale:g}; {config.label}; {args.latency}; "
          f"router view refreshed every {args.router_refresh_s:g} s")
    ref_s = _reference_loop_cpu_s()
    print(f"reference: 1e7-iteration Python loop takes {ref_s:.2f} CPU s here "
          f"(a quiet modern core: ~0.4-0.6 s); scale req/cpu_s by it to compare machines")
    print(f"simulator: {simulations.sim.MODE} modules; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    if args.baseline_requests:
        small = scale_rate(tile(base, args.baseline_requests), args.rate_scale)
        _, runs_s, _, _ = _run(small, config, args.latency)
        _, steps_s, _, _ = _run(small, dataclasses.replace(config, jump_decode_steps=False), args.latency)
        print(f"baseline ({args.baseline_requests} requests, CPU s): one event per decode step {steps_s:.2f} s, "
              f"decode runs {runs_s:.2f} s -> {steps_s / runs_s:.1f}x faster")
        if args.router_refresh_s:
            # Alternated and repeated: the two differ by less than a shared machine's noise.
            every, refreshed = [], [runs_s]
            for _ in range(3):
                every.append(_run(small, dataclasses.replace(config, router_refresh_s=0.0), args.latency)[1])
                refreshed.append(_run(small, config, args.latency)[1])
            every_s, refreshed_s = statistics.median(every), statistics.median(refreshed)
            print(f"baseline ({args.baseline_requests} requests, median CPU s): router view rebuilt on every arrival "
                  f"{every_s:.2f} s, every {args.router_refresh_s:g} s {refreshed_s:.2f} s "
                  f"-> {every_s / refreshed_s:.2f}x faster")
        if simulations.sim.MODE == "compiled":
            pure_s = _pure_cpu_s(args, args.baseline_requests)
            n = args.baseline_requests
            print(f"baseline ({n} requests, CPU s): pure Python {pure_s:.2f} s ({n / pure_s:,.0f} req/cpu_s), "
                  f"compiled {runs_s:.2f} s ({n / runs_s:,.0f} req/cpu_s) -> {pure_s / runs_s:.1f}x faster")

    print(f"{'requests':>10} {'wall_s':>8} {'req/s':>9} {'cpu_s':>8} {'req/cpu_s':>9} {'sim_tok/s':>11} "
          f"{'events':>10} {'cpu_us/req':>10} {'ratio':>6} {'peak_rss_MB':>11}")
    first_us: float | None = None
    last_req_per_s = 0.0
    for n in sizes:
        trace = scale_rate(tile(base, n), args.rate_scale)
        walls, cpus, events, tokens = [], [], 0, 0
        for _ in range(args.repeats):
            wall_s, cpu_s, events, tokens = _run(trace, config, args.latency)
            walls.append(wall_s)
            cpus.append(cpu_s)
        wall_s = statistics.median(walls)
        cpu_s = statistics.median(cpus)
        us_per_req = cpu_s / n * 1e6
        first_us = first_us or us_per_req
        print(f"{n:>10} {wall_s:>8.2f} {n / wall_s:>9,.0f} {cpu_s:>8.2f} {n / cpu_s:>9,.0f} {tokens / wall_s:>11,.0f} "
              f"{events:>10,} {us_per_req:>10.1f} {us_per_req / first_us:>6.2f} {_peak_rss_mb():>11,.0f}")
        last_req_per_s = n / wall_s
        del trace
    print(f"target {TARGET_REQ_PER_S:,} req/s (wall, at 1M): {last_req_per_s:,.0f} req/s at {sizes[-1]:,} requests "
          f"-> {last_req_per_s / TARGET_REQ_PER_S:.2f}x of target; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
