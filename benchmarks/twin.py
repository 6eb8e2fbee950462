"""The twin check: one trace slice through the live pdserve and through the simulator.

Steps, in order:

1. profile: the engine the embedded workers run (same block size, per-step
   token budget and max running sequences as ``workers.service.host`` builds)
   is timed on a grid of prefill and decode shapes in this process, before
   anything else runs, with ``simulations.profile_cmd.measure_profile``; the
   samples and their regression fit are written as a latency profile;
2. workload: a slice of a real trace becomes requests with the bench's
   ``plan_requests`` (lengths clipped as ``pdserve quickstart`` clips them),
   so both sides see the same arrival times, prompt lengths and output lengths;
3. live: ``start_embedded`` (local Ray, tiny model, 1 prefill + 1 decode
   worker, TCP KV transport); a few untimed warm-up requests, then an *idle
   probe* (a handful of requests sent one at a time, so nothing queues: the
   per-request and per-token overheads the simulator does not model show up
   alone), then the bench runner replays the slice over HTTP;
4. simulated: a 1P+1D cluster whose instances batch like the engine's
   scheduler (chunked prefill, decodes first, the engine's token budget), with
   the profile's regression latency, the engine's KV bytes per token and the
   transport's bandwidth, and the live router's routing and admission configs;
5. report: p50/p90 TTFT and TPOT, mean e2e, and the simulated-vs-live relative
   error of each, for the slice and for the idle probe (which the simulator
   also replays), as tables and (``--out``) as JSON with the profile's fit,
   its R², and the machine's load average before and after.

What the simulator leaves out, and so where the error comes from: HTTP, gRPC
and router overheads, the engine loop's Python per step, token streaming, and
CPU contention between the two workers, the router and this client on a
small machine (the profile is taken alone, its ``min`` statistic).

    python benchmarks/twin.py [--requests 40] [--rate-scale 1] [--out twin.json]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from orchestrator.core.slo import RequestLatency
from orchestrator.runtime.bench.report import Distribution, distribution
from orchestrator.runtime.bench.workload import BenchRequest, WorkloadOptions
from simulations.profile_cmd import ProfileGrid

# The grid of the full run: prefill lengths stay within the engine's token budget (512),
# so each timed prefill is one step; decode shapes cover the slice's batch and contexts.
FULL_GRID = ProfileGrid(
    prefill_lengths=(16, 64, 128, 256, 384, 512), decode_batches=(1, 2, 4, 8, 16),
    decode_contexts=(64, 256, 544), repeats=5, warmup_steps=2, decode_steps=8,
)


@dataclass(frozen=True)
class TwinConfig:
    """One twin run; defaults follow ``pdserve quickstart``."""

    trace: str = "azure-conv"  # trace name or file
    requests: int = 40  # requests of the slice
    rate_scale: float = 1.0  # arrival-rate multiplier
    start_s: float = 0.0  # skip this many seconds of the trace first
    max_prompt_tokens: int = 512  # prompt clip (quickstart's)
    max_output_tokens: int = 32  # output clip (quickstart's)
    context_tokens: int = 2048  # the tiny model's context window (quickstart's)
    num_kv_blocks: int = 512  # KV blocks per worker (start_embedded's default)
    kv_gbps: float = 3.7  # KV transfer bandwidth in GB/s (TCP loopback, MACHINE_NOTES)
    warmup_requests: int = 2  # untimed requests sent to the live system first
    idle_requests: int = 6  # requests sent one at a time (idle system) on both sides: fixed overheads
    grid: ProfileGrid = field(default_factory=lambda: FULL_GRID)
    profile_path: Path | None = None  # reuse this profile instead of measuring one
    cache_dir: Path | None = None  # where the tiny model is created once (default: pdserve's cache)
    model_dir: Path | None = None  # serve and profile this checkpoint instead of the tiny model

    def __post_init__(self) -> None:
        if self.requests < 1:
            raise ValueError(f"requests must be >= 1, got {self.requests}")
        if self.kv_gbps <= 0:
            raise ValueError(f"kv_gbps must be > 0, got {self.kv_gbps}")
        if self.warmup_requests < 0 or self.idle_requests < 0:
            raise ValueError(f"warmup_requests and idle_requests must be >= 0, got "
                             f"{self.warmup_requests}, {self.idle_requests}")

    def workload(self) -> WorkloadOptions:
        """The bench's workload options for this slice (validated there)."""
        return WorkloadOptions(
            rate_scale=self.rate_scale, start_s=self.start_s, limit=self.requests,
            max_prompt_tokens=self.max_prompt_tokens, max_output_tokens=self.max_output_tokens,
            context_tokens=self.context_tokens,
        )


@dataclass(frozen=True)
class SideResult:
    """One side's outcome: how many requests ended well, and the latency distributions."""

    num_requests: int
    num_ok: int
    ttft: Distribution | None
    tpot: Distribution | None
    e2e: Distribution | None
    wall_s: float  # seconds this side took to run (the simulator's is its compute time)


@dataclass(frozen=True)
class TwinReport:
    """Both sides, the errors between them, and what the simulator was given."""

    live: SideResult
    sim: SideResult
    errors: dict[str, float]  # metric -> (sim - live) / live
    idle_live: SideResult | None  # the idle probe: requests one at a time, no queueing on either side
    idle_sim: SideResult | None
    idle_errors: dict[str, float]
    settings: dict[str, Any]


def worker_engine_config(num_kv_blocks: int) -> Any:
    """The ``EngineConfig`` an embedded worker builds (``workers.service.host``), for the colocated profile."""
    from orchestrator.runtime.controller import ClusterConfig
    from workers.engine.config import EngineConfig

    deployed = ClusterConfig(model_dir="-", num_kv_blocks=num_kv_blocks)
    return EngineConfig(device=deployed.device, num_blocks=deployed.num_kv_blocks, max_num_seqs=deployed.max_num_seqs)


def profile_engine(model_dir: Path, config: Any, grid: ProfileGrid, out_path: Path) -> tuple[Any, float]:
    """Time ``grid`` on an engine built like ``config`` and write the profile; return (model, KV bytes per token)."""
    import torch

    from simulations.latency.profile import LatencyProfile, write_profile
    from simulations.latency.regression import fit_regression
    from simulations.profile_cmd import measure_profile
    from workers.engine.engine import LLMEngine
    from workers.engine.sampling_params import SamplingParams

    if max(grid.prefill_lengths) > config.max_num_batched_tokens:
        raise ValueError(f"prefill lengths must fit the engine's token budget {config.max_num_batched_tokens}, "
                         f"so that each timed prefill is one step; got {max(grid.prefill_lengths)}")
    blocks_per_seq = -(-grid.max_context // config.block_size) + 1
    needed = max(grid.decode_batches) * blocks_per_seq + 8
    # Same block size, token budget and max sequences as the worker; only room for the grid differs.
    engine_config = replace(config, num_blocks=max(needed, config.num_blocks or 0),
                            max_model_len=grid.max_context + config.block_size)
    engine = LLMEngine(model_dir, engine_config)
    prefill, decode = measure_profile(engine, grid, lambda n: SamplingParams(max_tokens=n, ignore_eos=True),
                                      lambda _n: None)
    fit = fit_regression(prefill, decode)
    layout = engine.kv_layout
    kv_bytes_per_token = layout.bytes_per_block / layout.block_size
    metadata: dict[str, str | int | float] = {
        "model": model_dir.name, "model_dir": str(model_dir), "device": str(engine.device),
        "dtype": str(layout.dtype).removeprefix("torch."), "tp_degree": 1, "engine": "pdserve",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "statistic": grid.statistic,
        "block_size": config.block_size, "max_num_batched_tokens": config.max_num_batched_tokens,
        "max_num_seqs": config.max_num_seqs, "kv_bytes_per_token": kv_bytes_per_token,
    }
    write_profile(out_path, LatencyProfile(metadata, tuple(prefill), tuple(decode), fit))
    return fit.model, kv_bytes_per_token


def plan(config: TwinConfig) -> list[BenchRequest]:
    """The slice both sides replay."""
    from orchestrator.runtime.bench.workload import plan_requests
    from simulations.traces import load_trace

    trace = load_trace(config.trace)
    return plan_requests(trace.arrival_s.tolist(), trace.prompt_tokens.tolist(), trace.output_tokens.tolist(),
                         config.workload())


def as_trace(name: str, requests: list[BenchRequest]) -> Any:
    """The simulator's ``Trace`` of exactly the planned requests (send times, clipped lengths)."""
    import numpy as np

    from simulations.traces.trace import Trace

    return Trace(
        name=name,
        arrival_s=np.array([r.send_at_s for r in requests], dtype=np.float64),
        prompt_tokens=np.array([r.prompt_tokens for r in requests], dtype=np.int64),
        output_tokens=np.array([r.max_tokens for r in requests], dtype=np.int64),
    )


def _side(latencies: list[RequestLatency], num_requests: int, wall_s: float) -> SideResult:
    """Distributions as the bench report computes them (TPOT over requests with >= 2 tokens)."""
    return SideResult(
        num_requests=num_requests, num_ok=len(latencies),
        ttft=distribution([lat.ttft_s for lat in latencies]),
        tpot=distribution([lat.tpot_s for lat in latencies if lat.output_tokens > 1]),
        e2e=distribution([lat.e2e_s for lat in latencies]),
        wall_s=wall_s,
    )


# Probe requests go through P then D (longer than the router's short-prompt limit) and
# start far enough apart that each runs alone on an idle system.
PROBE_PROMPT_TOKENS = (128, 256, 512)
PROBE_OUTPUT_TOKENS = 16
PROBE_SPACING_S = 0.5


def probe_requests(count: int) -> list[BenchRequest]:
    """``count`` requests sent one at a time (``PROBE_SPACING_S`` apart): fixed overheads, no queueing."""
    return [
        BenchRequest(index=i, send_at_s=i * PROBE_SPACING_S, prompt_tokens=PROBE_PROMPT_TOKENS[i % 3],
                     max_tokens=PROBE_OUTPUT_TOKENS, trace_prompt_tokens=PROBE_PROMPT_TOKENS[i % 3],
                     trace_output_tokens=PROBE_OUTPUT_TOKENS)
        for i in range(count)
    ]


def _reported_shapes(handle: Any) -> dict[str, dict[str, int]]:
    """What each live worker's load report says of its engine (role -> KV blocks, block size, max running)."""
    import ray

    view = ray.get(handle.controller.get_view.remote(), timeout=60)
    return {
        inst.role.value: {"total_kv_blocks": inst.total_kv_blocks, "block_size": inst.block_size,
                          "max_running_requests": inst.max_running_requests}
        for inst in view.snapshot.instances
    }


def run_live(
    config: TwinConfig, probes: list[BenchRequest], requests: list[BenchRequest]
) -> tuple[SideResult | None, SideResult, dict[str, Any]]:
    """Start the embedded system, warm it up, send the idle probes then the slice, stop it.

    Returns the probes' result (None without probes), the slice's, and the deployed knobs.
    """
    import asyncio

    from orchestrator.runtime.bench.report import latency_of
    from orchestrator.runtime.bench.runner import Endpoint, RequestResult, run_requests
    from orchestrator.runtime.embedded import start_embedded

    def side(results: list[RequestResult], wall_s: float) -> SideResult:
        return _side([lat for lat in (latency_of(r) for r in results) if lat is not None], len(results), wall_s)

    handle = start_embedded(num_prefill=1, num_decode=1, model_dir=config.model_dir, cache_dir=config.cache_dir,
                            transport="tcp", num_kv_blocks=config.num_kv_blocks)
    options = config.workload()
    try:
        deployed: dict[str, Any] = {"num_kv_blocks": handle.cluster.num_kv_blocks,
                                    "max_num_seqs": handle.cluster.max_num_seqs, "transport": handle.cluster.transport}
        endpoint = Endpoint(handle.url, handle.model_dir.name, timeout_s=300.0)
        warm = asyncio.run(run_requests(endpoint, probe_requests(config.warmup_requests), options))
        deployed["warmup_failed"] = sum(latency_of(r) is None for r in warm)
        idle: SideResult | None = None
        if probes:
            started = time.perf_counter()
            idle = side(asyncio.run(run_requests(endpoint, probes, options)), time.perf_counter() - started)
        started = time.perf_counter()
        results = asyncio.run(run_requests(endpoint, requests, options))
        wall_s = time.perf_counter() - started
        deployed["instances"] = _reported_shapes(handle)
    finally:
        handle.stop()
    # Requests that got fewer tokens than planned (with ignore_eos there should be none).
    deployed["short_outputs"] = [r.index for r in results if r.output_tokens and r.output_tokens != r.max_tokens]
    return idle, side(results, wall_s), deployed


def sim_cluster(engine_config: Any, num_kv_blocks: int, kv_bytes_per_token: float, kv_gbps: float) -> Any:
    """The simulated 1P+1D cluster that mirrors the embedded deployment."""
    from orchestrator.core.types import Role
    from orchestrator.runtime.disagg_backend import RouterConfig
    from simulations.sim.cluster import ClusterConfig, PoolSpec
    from simulations.sim.network import LinkConfig
    from simulations.sim.types import BatchPolicy

    router = RouterConfig()  # the live router's defaults: same routing and admission knobs

    def pool(role: Role) -> PoolSpec:
        # CHUNKED is the engine scheduler's policy: decodes first, then prompt chunks within the budget.
        return PoolSpec(role, 1, 1, num_kv_blocks, BatchPolicy.CHUNKED, engine_config.max_num_batched_tokens,
                        engine_config.max_num_seqs)

    return ClusterConfig(
        pools=(pool(Role.PREFILL), pool(Role.DECODE)), block_size=engine_config.block_size,
        links=LinkConfig(intra_node_gbps=kv_gbps, inter_node_gbps=kv_gbps),
        kv_bytes_per_token=kv_bytes_per_token, routing=router.routing, admission=router.admission,
        timeline_bucket_s=0.1,
    )


def run_sim(trace: Any, model: Any, cluster: Any) -> SideResult:
    """Replay ``trace`` through the simulated cluster."""
    from simulations.sim.cluster import ClusterSim
    from simulations.sim.results import collect

    sim = ClusterSim(trace, model, cluster)
    started = time.perf_counter()
    sim.run()
    wall_s = time.perf_counter() - started
    result = collect(sim)
    return _side(list(result.latencies()), len(trace), wall_s)


def relative_errors(live: SideResult, sim: SideResult) -> dict[str, float]:
    """(sim - live) / live for p50/p90 TTFT and TPOT and mean e2e (metrics either side lacks are left out)."""
    pairs = {
        "ttft_p50": (live.ttft, sim.ttft, "p50_s"), "ttft_p90": (live.ttft, sim.ttft, "p90_s"),
        "tpot_p50": (live.tpot, sim.tpot, "p50_s"), "tpot_p90": (live.tpot, sim.tpot, "p90_s"),
        "e2e_mean": (live.e2e, sim.e2e, "mean_s"),
    }
    errors: dict[str, float] = {}
    for name, (a, b, attr) in pairs.items():
        if a is None or b is None or getattr(a, attr) <= 0:
            continue
        errors[name] = (getattr(b, attr) - getattr(a, attr)) / getattr(a, attr)
    return errors


def run_twin(config: TwinConfig, work_dir: Path) -> TwinReport:
    """Profile, then run the slice live and simulated, and compare (see the module docstring)."""
    import os

    from simulations.latency.profile import load_profile, read_profile
    from workers.engine.tiny import ensure_tiny_model

    work_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    engine_config = worker_engine_config(config.num_kv_blocks)
    if config.profile_path is not None:
        model = load_profile(config.profile_path)
        kv_bytes_meta = read_profile(config.profile_path).metadata.get("kv_bytes_per_token")
        if kv_bytes_meta is None:
            raise ValueError(f"{config.profile_path}: no metadata.kv_bytes_per_token; use a profile a twin run wrote")
        kv_bytes = float(kv_bytes_meta)
        profile_path = config.profile_path
    else:
        profile_path = work_dir / "twin-profile.json"
        model_dir = config.model_dir or ensure_tiny_model(config.cache_dir)
        model, kv_bytes = profile_engine(model_dir, engine_config, config.grid, profile_path)
    requests = plan(config)
    if not requests:
        raise ValueError(f"the slice of {config.trace} is empty (start_s {config.start_s} past its end?)")
    # The simulator first: it takes milliseconds, and a bad setting there should not cost a live run.
    cluster = sim_cluster(engine_config, config.num_kv_blocks, kv_bytes, config.kv_gbps)
    sim = run_sim(as_trace(config.trace, requests), model, cluster)
    probes = probe_requests(config.idle_requests)
    idle_sim = run_sim(as_trace("idle-probe", probes), model, cluster) if probes else None
    idle_live, live, deployed = run_live(config, probes, requests)
    fit = read_profile(profile_path).fitted()
    settings: dict[str, Any] = {
        "load_avg_1m": {"before": load_before, "after": os.getloadavg()[0], "cpus": os.cpu_count()},
        "profile_r2": {"prefill": fit.prefill_r2, "decode": fit.decode_r2},
        "trace": config.trace, "requests": len(requests), "rate_scale": config.rate_scale,
        "span_s": requests[-1].send_at_s, "max_prompt_tokens": config.max_prompt_tokens,
        "max_output_tokens": config.max_output_tokens, "profile": str(profile_path),
        "latency_model": asdict(model) | {"tp": None}, "kv_bytes_per_token": kv_bytes, "kv_gbps": config.kv_gbps,
        "block_size": engine_config.block_size, "max_num_batched_tokens": engine_config.max_num_batched_tokens,
        "max_num_seqs": engine_config.max_num_seqs, "sim_policy": "chunked", "deployed": deployed,
    }
    idle_errors = relative_errors(idle_live, idle_sim) if idle_live is not None and idle_sim is not None else {}
    return TwinReport(live=live, sim=sim, errors=relative_errors(live, sim), idle_live=idle_live,
                      idle_sim=idle_sim, idle_errors=idle_errors, settings=settings)


_ROWS = (("TTFT p50", "ttft", "p50_s", "ttft_p50"), ("TTFT p90", "ttft", "p90_s", "ttft_p90"),
         ("TPOT p50", "tpot", "p50_s", "tpot_p50"), ("TPOT p90", "tpot", "p90_s", "tpot_p90"),
         ("e2e mean", "e2e", "mean_s", "e2e_mean"))


def _table(title: str, live: SideResult, sim: SideResult, errors: dict[str, float]) -> list[str]:
    lines = [f"{title:<10} {'live':>10} {'sim':>10} {'error':>8}"]
    for label, metric, attr, key in _ROWS:
        values = []
        for side in (live, sim):
            dist = getattr(side, metric)
            values.append(f"{getattr(dist, attr) * 1e3:>10.1f}" if dist is not None else f"{'-':>10}")
        err = errors.get(key)
        lines.append(f"{label:<10} {values[0]} {values[1]} {(f'{err:+.0%}' if err is not None else '-'):>8}")
    lines.append(f"finished: live {live.num_ok}/{live.num_requests}, sim {sim.num_ok}/{sim.num_requests}")
    return lines


def format_table(report: TwinReport) -> str:
    """The comparison as text tables (milliseconds; error = (sim - live) / live): the slice, then the idle probe."""
    s = report.settings
    lines = [f"{s['trace']}: {s['requests']} requests over {s['span_s']:.1f} s, 1P+1D, "
             f"KV {s['kv_bytes_per_token']:.0f} B/token at {s['kv_gbps']:g} GB/s",
             f"profile fit R^2: prefill {s['profile_r2']['prefill']:.2f}, decode {s['profile_r2']['decode']:.2f}; "
             f"1-min load average {s['load_avg_1m']['before']:.1f} -> {s['load_avg_1m']['after']:.1f} "
             f"on {s['load_avg_1m']['cpus']} CPUs"]
    lines += _table("slice (ms)", report.live, report.sim, report.errors)
    if report.idle_live is not None and report.idle_sim is not None:
        lines.append(f"idle probe: {report.idle_live.num_requests} requests one at a time "
                     f"(prompts {'/'.join(map(str, PROBE_PROMPT_TOKENS))}, {PROBE_OUTPUT_TOKENS} tokens out)")
        lines += _table("idle (ms)", report.idle_live, report.idle_sim, report.idle_errors)
    return "\n".join(lines)


def report_json(report: TwinReport) -> dict[str, Any]:
    """The JSON document ``--out`` gets."""
    return {"live": asdict(report.live), "sim": asdict(report.sim), "errors": report.errors,
            "idle_live": asdict(report.idle_live) if report.idle_live is not None else None,
            "idle_sim": asdict(report.idle_sim) if report.idle_sim is not None else None,
            "idle_errors": report.idle_errors, "settings": report.settings}


def main() -> int:
    """Parse options, run the twin check, print the table, write JSON."""
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", default="azure-conv", help="trace name or file (default azure-conv)")
    parser.add_argument("--requests", type=int, default=40, help="requests in the slice (default 40)")
    parser.add_argument("--rate-scale", type=float, default=1.0, help="arrival-rate multiplier (default 1)")
    parser.add_argument("--start-s", type=float, default=0.0, help="skip this many trace seconds first")
    parser.add_argument("--idle-requests", type=int, default=6,
                        help="requests sent one at a time before the slice, on both sides (default 6; 0: none)")
    parser.add_argument("--kv-gbps", type=float, default=3.7, help="KV bandwidth in GB/s for the simulator")
    parser.add_argument("--profile", type=Path, default=None, help="reuse this profile file (from a twin run)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where the tiny model is created once")
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON here (the measured profile goes next to it as twin-profile.json)")
    args = parser.parse_args()
    try:
        config = TwinConfig(trace=args.trace, requests=args.requests, rate_scale=args.rate_scale,
                            start_s=args.start_s, kv_gbps=args.kv_gbps, idle_requests=args.idle_requests,
                            profile_path=args.profile,
                            cache_dir=args.cache_dir)
    except ValueError as exc:
        parser.error(str(exc))
    work_dir = args.out.parent if args.out is not None else Path(tempfile.mkdtemp(prefix="pdserve-twin-"))
    report = run_twin(config, work_dir)
    print(format_table(report))
    if args.out is not None:
        args.out.write_text(json.dumps(report_json(report), indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    return 0 if report.live.num_ok == report.live.num_requests == report.sim.num_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
