"""Results of one run: per-request latencies, summary statistics, SLO attainment.

Definitions:
- TTFT: arrival to first token (queueing at the router included).
- TPOT: DistServe's ``(e2e - ttft) / (output_tokens - 1)`` from
  ``orchestrator.core.slo`` (0 for one-token outputs).
- TBT: every gap between two consecutive tokens of one request (a decode
  step, plus any prefill stall or KV transfer before it), weighted per token.
- ``tbt_worst10_mean_s``: Mooncake's tail metric taken over the whole run —
  the mean of the largest 10% of all token gaps (from the gap histogram, so
  at ~2.3% bin resolution).
- Latency statistics over no finished request (or TBT with no gap) are
  ``None`` (JSON null), never 0.
- attainment: fraction of *all* requests (rejected ones count as misses)
  meeting both TTFT and TPOT targets, via ``orchestrator.core.slo.attainment``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from orchestrator.core.slo import RequestLatency, SLOTarget, attainment
from simulations.sim.cluster import ClusterSim
from simulations.sim.recorder import GapHistogram, RequestStatus


def _stats(values: npt.NDArray[np.float64]) -> dict[str, float | None]:
    if len(values) == 0:  # nothing finished: absent, not 0 (which would read as instant)
        return {"mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"mean": float(values.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99),
            "max": float(values.max())}


def _gap_stats(gaps: GapHistogram) -> dict[str, float | None]:
    if gaps.total_weight <= 0:  # no second token anywhere: no gap to report
        return {"mean": None, "p50": None, "p90": None, "p99": None, "max": None, "worst10_mean": None,
                "count": 0.0}
    return {"mean": gaps.weighted_sum_s / gaps.total_weight, "p50": gaps.quantile_s(0.5),
            "p90": gaps.quantile_s(0.9), "p99": gaps.quantile_s(0.99), "max": gaps.max_s,
            "worst10_mean": gaps.worst_mean_s(0.1), "count": gaps.total_weight}


def format_s(value: float | None, digits: int = 3) -> str:
    """A latency for a text report; "-" when absent (nothing finished)."""
    return "-" if value is None else f"{value:.{digits}f}"


@dataclass
class RunResult:
    """Everything a run produced; ``summary`` is deterministic for a seed (no wall time)."""

    label: str
    num_gpus: int
    arrival_s: npt.NDArray[np.float64]
    prompt_tokens: npt.NDArray[np.int64]
    output_tokens: npt.NDArray[np.int64]
    status: npt.NDArray[np.int8]
    ttft_s: npt.NDArray[np.float64]
    e2e_s: npt.NDArray[np.float64]
    preemptions: npt.NDArray[np.int32]
    gaps: GapHistogram
    utilisation: dict[str, npt.NDArray[np.float64]]
    timeline_bucket_s: float
    summary: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def tpot_s(self) -> npt.NDArray[np.float64]:
        """Per-request TPOT (NaN for unfinished requests)."""
        decode = np.maximum(self.output_tokens - 1, 1)
        tpot = (self.e2e_s - self.ttft_s) / decode
        return np.where(self.output_tokens <= 1, np.where(np.isnan(self.e2e_s), np.nan, 0.0), tpot)

    def latencies(self) -> Iterator[RequestLatency]:
        """Core ``RequestLatency`` of every finished request."""
        done = np.flatnonzero(self.status == RequestStatus.FINISHED)
        for ttft, e2e, out in zip(self.ttft_s[done].tolist(), self.e2e_s[done].tolist(),
                                  self.output_tokens[done].tolist(), strict=True):
            yield RequestLatency(ttft, e2e, out)

    def attainment(self, target: SLOTarget) -> float:
        """Fraction of all requests meeting both targets (rejections are misses)."""
        total = len(self.status)
        if total == 0:
            return 0.0
        finished = int(np.count_nonzero(self.status == RequestStatus.FINISHED))
        return attainment(self.latencies(), target) * finished / total

    def to_json(self) -> str:
        """Deterministic JSON of the summary (sorted keys)."""
        return json.dumps(self.summary, sort_keys=True, indent=2)

    def write_requests_csv(self, path: str) -> None:
        """One row per request: arrival, sizes, status, TTFT, TPOT, e2e, preemptions."""
        status_names = np.array([s.name.lower() for s in RequestStatus])
        with open(path, "w", encoding="utf-8") as fh:
            fh.write("request,arrival_s,prompt_tokens,output_tokens,status,ttft_s,tpot_s,e2e_s,preemptions\n")
            cols = zip(self.arrival_s.tolist(), self.prompt_tokens.tolist(), self.output_tokens.tolist(),
                       status_names[self.status].tolist(), self.ttft_s.tolist(), self.tpot_s.tolist(),
                       self.e2e_s.tolist(), self.preemptions.tolist(), strict=True)
            for i, (arr, p, o, st, ttft, tpot, e2e, pre) in enumerate(cols):
                fh.write(f"{i},{arr:.6f},{p},{o},{st},{ttft:.6f},{tpot:.6f},{e2e:.6f},{pre}\n")


def collect(sim: ClusterSim, slo: SLOTarget | None = None) -> RunResult:
    """Build the result of a finished ``sim`` run, with attainment when ``slo`` is given."""
    rec = sim.recorder
    trace = sim.trace
    status, ttft_s, e2e_s, preemptions = rec.arrays()
    end_s = float(np.nanmax(trace.arrival_s + e2e_s)) if np.any(~np.isnan(e2e_s)) else 0.0
    buckets = int(end_s / sim.config.timeline_bucket_s) + 1
    util = {inst.spec.instance_id: inst.timeline.utilisation(buckets) for inst in sim.instances}
    result = RunResult(
        label=sim.config.label, num_gpus=sim.config.num_gpus, arrival_s=trace.arrival_s,
        prompt_tokens=trace.prompt_tokens, output_tokens=trace.output_tokens, status=status,
        ttft_s=ttft_s, e2e_s=e2e_s, preemptions=preemptions, gaps=rec.gaps,
        utilisation=util, timeline_bucket_s=sim.config.timeline_bucket_s,
    )
    finished = status == RequestStatus.FINISHED
    start_s = float(trace.arrival_s[0]) if len(trace) else 0.0
    span_s = max(end_s - start_s, 1e-12)
    gaps = rec.gaps
    summary: dict[str, Any] = {
        "cluster": sim.config.label,
        "num_gpus": sim.config.num_gpus,
        "trace": trace.name,
        "requests": len(trace),
        "finished": int(finished.sum()),
        "rejected": int(np.count_nonzero(status == RequestStatus.REJECTED)),
        "rejected_reasons": dict(sorted(rec.rejected_reason.items())),
        "preemptions": int(preemptions.sum()),
        "sim_end_s": end_s,
        "throughput_rps": float(finished.sum()) / span_s,
        "output_tokens_per_s": float(trace.output_tokens[finished].sum()) / span_s,
        "ttft_s": _stats(ttft_s[finished]),
        "tpot_s": _stats(result.tpot_s[finished]),
        "e2e_s": _stats(e2e_s[finished]),
        "tbt_s": _gap_stats(gaps),
        "kv_bytes_moved": sim.network.bytes_moved,
        "events": sim.loop.events_run,
        "instances": [
            {"id": inst.spec.instance_id, "role": inst.spec.role.value, "node": inst.spec.node_id,
             "tp": inst.spec.tp_degree, "busy_fraction": inst.busy_s / span_s,
             "prefill_tokens": inst.prefill_tokens_done, "decode_tokens": inst.decode_tokens_done,
             "preemptions": inst.preemptions}
            for inst in sim.instances
        ],
    }
    if slo is not None:
        summary["slo"] = {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s, "target": slo.attainment,
                          "attainment": result.attainment(slo)}
    result.summary = summary
    return result
