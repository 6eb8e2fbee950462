"""The twin check: one trace slice through the live pdserve and through the simulator.

Steps, in order:

1. profile: the engine the embedded workers run (same block size, per-step
   token budget and max running sequences as ``workers.service.host`` builds)
   is timed on a grid of shapes in this process, before anything else runs
   (``simulations.profile_cmd.profile_engine_config``);
2. workload: a slice of a real trace becomes requests with the bench's
   ``plan_requests`` (lengths clipped as ``pdserve quickstart`` clips them),
   so both sides see the same arrival times, prompt lengths and output lengths;
3. live: ``start_embedded`` (local Ray, tiny model, 1 prefill + 1 decode
   worker, TCP KV transport); a few untimed warm-up requests, then the
   *probes* (requests sent one at a time so none queues behind another:
   first to the idle system, then beside one long decode), then the bench
   runner replays the slice over HTTP;
4. calibration: the probes, live and simulated without overheads, give the
   serving overheads the engine's profile leaves out
   (``simulations.latency.overhead.fit_overheads``: per request, per
   prefill->decode hand-off, per decode step and running request), stored in
   the profile file (``overheads``). ``--no-calibrate`` skips it (a reused
   ``--profile``'s stored overheads still apply);
5. simulated: a 1P+1D cluster that batches like the engine's scheduler
   (chunked prefill, decodes first, the engine's token budget) with the
   profile's regression latency, the engine's KV bytes per token, the
   transport's bandwidth and the live router's routing and admission
   configs; once bare and once with the overheads (request overhead on the
   cluster, hand-off as the KV transfer's latency, step terms on the model);
6. report: p50/p90 TTFT and TPOT, mean e2e and the simulated-vs-live error
   of each, for the slice and the probes, bare and with overheads, as tables
   and (``--out``) JSON with the fit, the overheads and the load average.

What the simulator still leaves out: CPU contention between the two
workers, the router, this client and anything else on a small machine,
which grows with load (the profile is taken alone, its ``min`` statistic);
it shows in the slice's tails.

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
from simulations.latency import overhead
from simulations.latency.overhead import Overheads, Probe
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
    idle_requests: int = 8  # probes sent one at a time to an idle system, on both sides
    busy_requests: int = 8  # probes sent one at a time beside one long decode (``probe_requests``)
    calibrate: bool = True  # fit the serving overheads on the probes and apply them to the simulator
    grid: ProfileGrid = field(default_factory=lambda: FULL_GRID)
    profile_path: Path | None = None  # reuse this profile instead of measuring one
    cache_dir: Path | None = None  # where the tiny model is created once (default: pdserve's cache)
    model_dir: Path | None = None  # serve and profile this checkpoint instead of the tiny model

    def __post_init__(self) -> None:
        if self.requests < 1:
            raise ValueError(f"requests must be >= 1, got {self.requests}")
        if self.kv_gbps <= 0:
            raise ValueError(f"kv_gbps must be > 0, got {self.kv_gbps}")
        if min(self.warmup_requests, self.idle_requests, self.busy_requests) < 0:
            raise ValueError(f"warmup_requests, idle_requests and busy_requests must be >= 0, got "
                             f"{self.warmup_requests}, {self.idle_requests}, {self.busy_requests}")

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
    """Both sides, the errors between them, and what the simulator was given.

    ``sim``/``errors`` are the simulator with ``overheads`` applied (the same as
    the bare ones when there are none); ``bare_*`` leave them out.
    """

    live: SideResult
    sim: SideResult
    errors: dict[str, float]  # metric -> (sim - live) / live
    idle_live: SideResult | None  # the probes (background request left out): one at a time, none queued behind another
    idle_sim: SideResult | None
    idle_errors: dict[str, float]
    settings: dict[str, Any]
    overheads: Overheads | None = None  # applied to ``sim`` and ``idle_sim``
    bare_sim: SideResult | None = None  # the simulator without overheads
    bare_errors: dict[str, float] = field(default_factory=dict)
    bare_idle_sim: SideResult | None = None
    bare_idle_errors: dict[str, float] = field(default_factory=dict)


def worker_engine_config(num_kv_blocks: int) -> Any:
    """The ``EngineConfig`` an embedded worker builds (``workers.service.host``), for the colocated profile."""
    from orchestrator.runtime.controller import ClusterConfig
    from workers.engine.config import EngineConfig

    deployed = ClusterConfig(model_dir="-", num_kv_blocks=num_kv_blocks)
    return EngineConfig(device=deployed.device, num_blocks=deployed.num_kv_blocks, max_num_seqs=deployed.max_num_seqs)


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


def probe_requests(alone: int, busy: int = 0) -> tuple[list[BenchRequest], list[Probe]]:
    """The probes of ``probe_plan`` (idle, then beside one long decode) as bench requests, and the plan."""
    probes = overhead.probe_plan(alone, busy)
    return [BenchRequest(index=i, send_at_s=p.at_s, prompt_tokens=p.prompt_tokens, max_tokens=p.output_tokens,
                         trace_prompt_tokens=p.prompt_tokens, trace_output_tokens=p.output_tokens)
            for i, p in enumerate(probes)], probes


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
) -> tuple[list[RequestLatency | None], float, SideResult, dict[str, Any]]:
    """Start the embedded system, warm it up, send the probes then the slice, stop it.

    Returns each probe's latency (None where it failed) and the probes' wall time, the
    slice's result, and the deployed knobs.
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
        warm = asyncio.run(run_requests(endpoint, probe_requests(config.warmup_requests)[0], options))
        deployed["warmup_failed"] = sum(latency_of(r) is None for r in warm)
        idle_each: list[RequestLatency | None] = []
        started = time.perf_counter()
        if probes:
            probed = sorted(asyncio.run(run_requests(endpoint, probes, options)), key=lambda r: r.index)
            idle_each = [latency_of(r) for r in probed]
        idle_wall_s = time.perf_counter() - started
        started = time.perf_counter()
        results = asyncio.run(run_requests(endpoint, requests, options))
        wall_s = time.perf_counter() - started
        deployed["instances"] = _reported_shapes(handle)
    finally:
        handle.stop()
    # Requests that got fewer tokens than planned (with ignore_eos there should be none).
    deployed["short_outputs"] = [r.index for r in results if r.output_tokens and r.output_tokens != r.max_tokens]
    return idle_each, idle_wall_s, side(results, wall_s), deployed


def sim_cluster(engine_config: Any, num_kv_blocks: int, kv_bytes_per_token: float, kv_gbps: float,
                overheads: Overheads | None = None) -> Any:
    """The simulated 1P+1D cluster that mirrors the embedded deployment, with ``overheads``' request terms."""
    from orchestrator.core.types import Role
    from orchestrator.runtime.disagg_backend import RouterConfig
    from simulations.sim.cluster import ClusterConfig, PoolSpec
    from simulations.sim.network import LinkConfig
    from simulations.sim.types import BatchPolicy

    router = RouterConfig()  # the live router's defaults: same routing and admission knobs
    o = overheads or Overheads()

    def pool(role: Role) -> PoolSpec:
        # CHUNKED is the engine scheduler's policy: decodes first, then prompt chunks within the budget.
        return PoolSpec(role, 1, 1, num_kv_blocks, BatchPolicy.CHUNKED, engine_config.max_num_batched_tokens,
                        engine_config.max_num_seqs)

    return ClusterConfig(
        pools=(pool(Role.PREFILL), pool(Role.DECODE)), block_size=engine_config.block_size,
        links=LinkConfig(intra_node_gbps=kv_gbps, inter_node_gbps=kv_gbps, transfer_latency_s=o.handoff_s),
        kv_bytes_per_token=kv_bytes_per_token, routing=router.routing, admission=router.admission,
        timeline_bucket_s=0.1, request_overhead_s=o.request_s,
    )


def run_sim(trace: Any, model: Any, cluster: Any) -> tuple[SideResult, list[RequestLatency | None], float]:
    """Replay ``trace`` through the simulated cluster.

    Returns the result, each request's latency (None if not finished), and the share of the
    run's span the decode instance was busy.
    """
    import math

    from simulations.sim.cluster import ClusterSim
    from simulations.sim.results import collect

    sim = ClusterSim(trace, model, cluster)
    started = time.perf_counter()
    sim.run()
    wall_s = time.perf_counter() - started
    result = collect(sim)
    each = [RequestLatency(t, e, n) if not math.isnan(e) else None for t, e, n in
            zip(result.ttft_s.tolist(), result.e2e_s.tolist(), result.output_tokens.tolist(), strict=True)]
    busy = max(i["busy_fraction"] for i in result.summary["instances"] if i["role"] == "decode")
    return _side(list(result.latencies()), len(trace), wall_s), each, busy


def calibrate(probes: list[Probe], live: list[RequestLatency | None], bare: list[RequestLatency | None],
              busy_fraction: float = 1.0) -> Overheads:
    """The overheads that make the bare simulator match the probes (``fit_overheads``); failed probes skipped."""
    samples = [overhead.IdleSample(p.output_tokens, a.ttft_s, a.e2e_s, b.ttft_s, b.e2e_s, p.decode_batch)
               for p, a, b in zip(probes, live, bare, strict=True) if not p.background and a and b]
    if not samples:
        raise RuntimeError("no probe request finished on both sides: nothing to calibrate on")
    return overhead.fit_overheads(samples, busy_fraction)


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
    """Profile, run the slice live, calibrate the overheads, simulate with and without them, compare."""
    import os

    from simulations.latency.profile import load_profile, read_profile, write_profile
    from simulations.profile_cmd import profile_engine_config
    from workers.engine.tiny import ensure_tiny_model

    work_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    engine_config = worker_engine_config(config.num_kv_blocks)
    profile_path = work_dir / "twin-profile.json"
    if config.profile_path is not None:
        model = load_profile(config.profile_path)
        kv_bytes_meta = read_profile(config.profile_path).metadata.get("kv_bytes_per_token")
        if kv_bytes_meta is None:
            raise ValueError(f"{config.profile_path}: no metadata.kv_bytes_per_token; use a profile a twin run wrote")
        kv_bytes = float(kv_bytes_meta)
        profile_path = config.profile_path
    else:
        model_dir = config.model_dir or ensure_tiny_model(config.cache_dir)
        model, kv_bytes = profile_engine_config(model_dir, engine_config, config.grid, profile_path)
    profile = read_profile(profile_path)
    requests = plan(config)
    if not requests:
        raise ValueError(f"the slice of {config.trace} is empty (start_s {config.start_s} past its end?)")
    # The bare simulator first: it takes milliseconds, and a bad setting there should not cost a live run.
    bare_cluster = sim_cluster(engine_config, config.num_kv_blocks, kv_bytes, config.kv_gbps)
    trace = as_trace(config.trace, requests)
    bare_sim = run_sim(trace, model, bare_cluster)[0]
    sent, probe_list = probe_requests(config.idle_requests, config.busy_requests)
    probes = [p for p in probe_list if not p.background]
    probe_trace = as_trace("probe", sent)

    def probe_side(each: list[RequestLatency | None], wall_s: float) -> SideResult | None:
        kept = [lat for p, lat in zip(probe_list, each, strict=True) if not p.background]
        return _side([lat for lat in kept if lat is not None], len(kept), wall_s) if probes else None

    bare_idle_each = run_sim(probe_trace, model, bare_cluster)[1] if probes else []
    idle_live_each, idle_wall_s, live, deployed = run_live(config, sent, requests)
    idle_live, bare_idle = probe_side(idle_live_each, idle_wall_s), probe_side(bare_idle_each, 0.0)
    def simulate(o: Overheads) -> tuple[SideResult, float]:
        side, _, busy = run_sim(trace, overhead.with_step_overheads(model, o),
                                sim_cluster(engine_config, config.num_kv_blocks, kv_bytes, config.kv_gbps, o))
        return side, busy

    overheads = profile.overheads
    busy_fraction = None
    if config.calibrate and probes:
        # The request overhead depends on how busy the decode worker is: take its busy share
        # from simulating the slice with overheads fitted as if it were always busy.
        busy_fraction = simulate(calibrate(probe_list, idle_live_each, bare_idle_each))[1]
        overheads = calibrate(probe_list, idle_live_each, bare_idle_each, min(busy_fraction, 1.0))
        profile_path = work_dir / "twin-profile.json"
        write_profile(profile_path, replace(profile, overheads=overheads))
    sim, idle_sim = bare_sim, bare_idle
    if overheads is not None:
        sim = simulate(overheads)[0]
        cluster = sim_cluster(engine_config, config.num_kv_blocks, kv_bytes, config.kv_gbps, overheads)
        idle_sim = probe_side(run_sim(probe_trace, overhead.with_step_overheads(model, overheads), cluster)[1], 0.0)
    fit = profile.fitted()
    settings: dict[str, Any] = {
        "load_avg_1m": {"before": load_before, "after": os.getloadavg()[0], "cpus": os.cpu_count()},
        "profile_r2": {"prefill": fit.prefill_r2, "decode": fit.decode_r2},
        "trace": config.trace, "requests": len(requests), "rate_scale": config.rate_scale,
        "span_s": requests[-1].send_at_s, "max_prompt_tokens": config.max_prompt_tokens,
        "max_output_tokens": config.max_output_tokens, "profile": str(profile_path),
        "latency_model": asdict(model) | {"tp": None}, "kv_bytes_per_token": kv_bytes, "kv_gbps": config.kv_gbps,
        "block_size": engine_config.block_size, "max_num_batched_tokens": engine_config.max_num_batched_tokens,
        "max_num_seqs": engine_config.max_num_seqs, "sim_policy": "chunked", "deployed": deployed,
        "probes": {"alone": config.idle_requests, "busy": config.busy_requests},
        "decode_busy_fraction": busy_fraction,
        "probe_ttft_gap_ms": [(p.prompt_tokens, p.decode_batch, round((a.ttft_s - b.ttft_s) * 1e3, 1)) for p, a, b
                              in zip(probe_list, idle_live_each, bare_idle_each, strict=True) if a and b and not p.background],
        "overheads_from": ("probe" if config.calibrate and probes else
                           "profile file" if overheads is not None else "none"),
    }

    def errors(sim_side: SideResult | None, live_side: SideResult | None) -> dict[str, float]:
        return relative_errors(live_side, sim_side) if live_side is not None and sim_side is not None else {}

    return TwinReport(live=live, sim=sim, errors=errors(sim, live), idle_live=idle_live, idle_sim=idle_sim,
                      idle_errors=errors(idle_sim, idle_live), settings=settings, overheads=overheads,
                      bare_sim=bare_sim, bare_errors=errors(bare_sim, live), bare_idle_sim=bare_idle,
                      bare_idle_errors=errors(bare_idle, idle_live))


_ROWS = (("TTFT p50", "ttft", "p50_s", "ttft_p50"), ("TTFT p90", "ttft", "p90_s", "ttft_p90"),
         ("TPOT p50", "tpot", "p50_s", "tpot_p50"), ("TPOT p90", "tpot", "p90_s", "tpot_p90"),
         ("e2e mean", "e2e", "mean_s", "e2e_mean"))


def _table(title: str, live: SideResult, sims: list[tuple[SideResult, dict[str, float]]]) -> list[str]:
    """Rows of metrics: live, then each simulated side with its error."""
    def ms(side: SideResult, metric: str, attr: str) -> str:
        dist = getattr(side, metric)
        return f"{getattr(dist, attr) * 1e3:>10.1f}" if dist is not None else f"{'-':>10}"

    head = "".join(f" {'sim' if i == 0 and len(sims) == 1 else ('bare' if i == 0 else 'sim+ovh'):>10} {'error':>7}"
                   for i in range(len(sims)))
    lines = [f"{title:<10} {'live':>10}{head}"]
    for label, metric, attr, key in _ROWS:
        row = f"{label:<10} {ms(live, metric, attr)}"
        for side, errs in sims:
            err = errs.get(key)
            row += f" {ms(side, metric, attr)} {(f'{err:+.0%}' if err is not None else '-'):>7}"
        lines.append(row)
    done = ", ".join(f"sim {side.num_ok}/{side.num_requests}" for side, _ in sims)
    lines.append(f"finished: live {live.num_ok}/{live.num_requests}, {done}")
    return lines


def format_table(report: TwinReport) -> str:
    """The comparison as text tables (ms; error = (sim - live) / live): the slice, then the probes.

    With overheads, each table has the bare simulator and the one with overheads side by side.
    """
    s = report.settings
    lines = [f"{s['trace']}: {s['requests']} requests over {s['span_s']:.1f} s, 1P+1D, "
             f"KV {s['kv_bytes_per_token']:.0f} B/token at {s['kv_gbps']:g} GB/s",
             f"profile fit R^2: prefill {s['profile_r2']['prefill']:.2f}, decode {s['profile_r2']['decode']:.2f}; "
             f"1-min load average {s['load_avg_1m']['before']:.1f} -> {s['load_avg_1m']['after']:.1f} "
             f"on {s['load_avg_1m']['cpus']} CPUs"]
    o = report.overheads
    if o is not None:
        lines.append(f"overheads ({s['overheads_from']}): request {o.request_s * 1e3:.1f} ms, hand-off "
                     f"{o.handoff_s * 1e3:.1f} ms, decode step {o.decode_step_s * 1e3:.2f} ms + "
                     f"{o.decode_token_s * 1e3:.2f} ms per running request, "
                     + (f"decode worker busy {s['decode_busy_fraction']:.0%} of the slice, "
                        if s.get("decode_busy_fraction") is not None else "") +
                     f"prefill step {o.prefill_step_s * 1e3:.2f} ms")

    r = report
    bare = [(r.bare_sim, r.bare_errors)] if o is not None and r.bare_sim is not None else []
    lines += _table("slice (ms)", r.live, bare + [(r.sim, r.errors)])
    if r.idle_live is not None and r.idle_sim is not None:
        lines.append(f"probe: {s['probes']['alone']} requests one at a time on an idle system, then "
                     f"{s['probes']['busy']} beside one long decode "
                     f"(prompts {'/'.join(map(str, overhead.PROBE_PROMPT_TOKENS))}, "
                     f"{'/'.join(map(str, overhead.PROBE_OUTPUT_TOKENS))} tokens out; the overheads are fitted on it)")
        bare = [(r.bare_idle_sim, r.bare_idle_errors)] if o is not None and r.bare_idle_sim is not None else []
        lines += _table("probe (ms)", r.idle_live, bare + [(r.idle_sim, r.idle_errors)])
    return "\n".join(lines)


def report_json(report: TwinReport) -> dict[str, Any]:
    """The JSON document ``--out`` gets (every field of the report)."""
    return asdict(report)


def main() -> int:
    """Parse options, run the twin check, print the table, write JSON."""
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", default="azure-conv", help="trace name or file (default azure-conv)")
    parser.add_argument("--requests", type=int, default=40, help="requests in the slice (default 40)")
    parser.add_argument("--rate-scale", type=float, default=1.0, help="arrival-rate multiplier (default 1)")
    parser.add_argument("--start-s", type=float, default=0.0, help="skip this many trace seconds first")
    parser.add_argument("--idle-requests", type=int, default=8,
                        help="probes sent one at a time to the idle system before the slice (default 8; 0: none)")
    parser.add_argument("--busy-requests", type=int, default=8,
                        help="probes sent one at a time beside one long decode, after those (default 8; 0: none)")
    parser.add_argument("--no-calibrate", action="store_true",
                        help="do not fit overheads on the probes (a --profile's stored overheads still apply)")
    parser.add_argument("--kv-gbps", type=float, default=3.7, help="KV bandwidth in GB/s for the simulator")
    parser.add_argument("--profile", type=Path, default=None, help="reuse this profile file (from a twin run)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where the tiny model is created once")
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON here (the measured profile goes next to it as twin-profile.json)")
    args = parser.parse_args()
    try:
        config = TwinConfig(trace=args.trace, requests=args.requests, rate_scale=args.rate_scale,
                            start_s=args.start_s, kv_gbps=args.kv_gbps, idle_requests=args.idle_requests,
                            calibrate=not args.no_calibrate, busy_requests=args.busy_requests,
                            profile_path=args.profile, cache_dir=args.cache_dir)
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
