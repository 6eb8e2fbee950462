"""Goodput: the highest request rate a deployment serves within its SLO, per GPU.

DistServe's definition: goodput is the highest arrival rate at which at
least ``attainment`` (90%) of requests meet both the TTFT and TPOT targets;
per-GPU goodput divides it by the GPUs the deployment uses. The rate is
varied by compressing the trace's arrival times (``scale_rate``), so the mix
of prompt and output lengths is the trace's own.

The search doubles (or halves) the rate until attainment crosses the target,
then bisects on a log scale to a relative tolerance. The placement search
(DistServe's) runs it for every split of a GPU budget into prefill and
decode instances and tensor-parallel degrees, plus the colocated baseline.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from orchestrator.core.slo import SLOTarget
from simulations.experiments.specs import ClusterKnobs, LatencySetup, Placement, build_cluster
from simulations.sim.cluster import ClusterSim
from simulations.sim.results import RunResult, collect
from simulations.traces.trace import Trace


@dataclass(frozen=True, slots=True)
class RatePoint:
    """Attainment measured at one rate."""

    rate_rps: float
    attainment: float


@dataclass(frozen=True, slots=True)
class RateSearch:
    """Outcome of one bisection: the best passing rate and every point tried."""

    goodput_rps: float  # 0.0 when even the lowest rate tried fails
    points: tuple[RatePoint, ...]
    saturated: bool = False  # True when the highest rate tried still passed


def search_max_rate(
    attainment_at: Callable[[float], float], start_rps: float, target: float,
    rel_tol: float = 0.03, max_expand: int = 12,
) -> RateSearch:
    """Highest rate with ``attainment_at(rate) >= target``, to ``rel_tol`` (bisection on log scale)."""
    if start_rps <= 0:
        raise ValueError(f"start_rps must be positive, got {start_rps}")
    if not 0 < rel_tol < 1:
        raise ValueError(f"rel_tol must be in (0, 1), got {rel_tol}")
    points: list[RatePoint] = []

    def probe(rate: float) -> bool:
        a = attainment_at(rate)
        points.append(RatePoint(rate, a))
        return a >= target

    rate = start_rps
    lo: float | None = None
    hi: float | None = None
    if probe(rate):
        lo = rate
        for _ in range(max_expand):
            rate *= 2.0
            if not probe(rate):
                hi = rate
                break
            lo = rate
        if hi is None:
            return RateSearch(lo, tuple(points), saturated=True)
    else:
        hi = rate
        # Below start/64 more waiting is not the problem (e.g. prompts whose prefill alone misses TTFT).
        for _ in range(min(max_expand, 6)):
            rate /= 2.0
            if probe(rate):
                lo = rate
                break
            hi = rate
        if lo is None:
            return RateSearch(0.0, tuple(points))
    while hi / lo > 1.0 + rel_tol:
        mid = math.sqrt(lo * hi)
        if probe(mid):
            lo = mid
        else:
            hi = mid
    return RateSearch(lo, tuple(sorted(points, key=lambda p: p.rate_rps)))


def run_at_rate(trace: Trace, rate_rps: float, latency: LatencySetup, placement: Placement,
                knobs: ClusterKnobs, slo: SLOTarget) -> RunResult:
    """Simulate ``trace`` rescaled to ``rate_rps`` on ``placement``."""
    from simulations.traces import scale_rate

    base_rps = trace_rate_rps(trace)
    scaled = scale_rate(trace, rate_rps / base_rps)
    config = build_cluster(placement, latency, knobs, timeline_bucket_s=max(1e-3, scaled.duration_s / 200))
    sim = ClusterSim(scaled, latency.model, config)
    sim.run()
    return collect(sim, slo)


def trace_rate_rps(trace: Trace) -> float:
    """Mean arrival rate of ``trace`` (requests per second)."""
    if len(trace) < 2 or trace.duration_s <= 0:
        raise ValueError(f"trace {trace.name!r} needs >= 2 requests spread over time to define a rate")
    return (len(trace) - 1) / trace.duration_s


@dataclass(frozen=True, slots=True)
class PlacementGoodput:
    """Goodput of one placement."""

    placement: Placement
    search: RateSearch

    @property
    def per_gpu_rps(self) -> float:
        """Goodput divided by the GPUs the placement uses."""
        return self.search.goodput_rps / self.placement.num_gpus


def placements(gpu_budget: int, tp_options: Iterable[int], latency: LatencySetup,
               include_colocated: bool = True, include_disaggregated: bool = True) -> list[Placement]:
    """Every colocated (all GPUs) and disaggregated (<= budget) placement whose TP degrees fit the model."""
    tps = sorted({tp for tp in tp_options if tp >= 1 and latency.fits(tp)})
    out: list[Placement] = []
    if include_colocated:
        out += [Placement(colocated=gpu_budget // tp, colocated_tp=tp) for tp in tps if gpu_budget // tp >= 1]
    if include_disaggregated:
        for ptp in tps:
            for dtp in tps:
                for p in range(1, gpu_budget // ptp + 1):
                    for d in range(1, (gpu_budget - p * ptp) // dtp + 1):
                        out.append(Placement(prefill=p, prefill_tp=ptp, decode=d, decode_tp=dtp))
    return out


def placement_goodput(trace: Trace, latency: LatencySetup, placement: Placement, knobs: ClusterKnobs,
                      slo: SLOTarget, rel_tol: float = 0.03,
                      on_probe: Callable[[Placement, float, float], None] | None = None) -> PlacementGoodput:
    """Bisect the goodput of one placement, starting from the trace's own rate times its GPU count."""

    def attainment_at(rate: float) -> float:
        a = run_at_rate(trace, rate, latency, placement, knobs, slo).attainment(slo)
        if on_probe is not None:
            on_probe(placement, rate, a)
        return a

    start = trace_rate_rps(trace) * max(1, placement.num_gpus) / 4.0
    return PlacementGoodput(placement, search_max_rate(attainment_at, start, slo.attainment, rel_tol))
