"""Benchmark summaries as pure functions of the recorded results.

Latency distributions cover successful requests only; SLO attainment is
over *all* requests, a failed request counting as a miss (a server cannot
improve its attainment by failing slow requests). TPOT follows
``orchestrator.core.slo`` (DistServe): ``(e2e - ttft) / (output_tokens - 1)``,
defined for requests with at least two output tokens.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from orchestrator.core.slo import RequestLatency, SLOTarget, meets, percentile
from orchestrator.runtime.bench.runner import Outcome, RequestResult


@dataclass(frozen=True, slots=True)
class Distribution:
    """Mean and percentiles of one latency, in seconds."""

    count: int
    mean_s: float
    p50_s: float
    p90_s: float
    p99_s: float


@dataclass(frozen=True, slots=True)
class BenchReport:
    """Everything ``pdserve bench`` prints and saves besides the per-request rows."""

    num_requests: int
    num_ok: int
    errors: dict[str, int]
    duration_s: float
    request_throughput_per_s: float
    output_tokens_per_s: float
    ttft: Distribution | None
    tpot: Distribution | None
    e2e: Distribution | None
    ttft_slo_s: float | None
    tpot_slo_s: float | None
    slo_attainment: float | None


def distribution(values: Sequence[float]) -> Distribution | None:
    """Mean, p50, p90 and p99 of ``values`` (``None`` when empty)."""
    if not values:
        return None
    return Distribution(
        count=len(values),
        mean_s=math.fsum(values) / len(values),
        p50_s=percentile(values, 50),
        p90_s=percentile(values, 90),
        p99_s=percentile(values, 99),
    )


def latency_of(result: RequestResult) -> RequestLatency | None:
    """The core's latency record of a successful request."""
    if result.outcome is not Outcome.OK or result.ttft_s is None or result.e2e_s is None:
        return None
    return RequestLatency(ttft_s=result.ttft_s, e2e_s=result.e2e_s, output_tokens=result.output_tokens)


def error_key(result: RequestResult) -> str:
    """How a failed request is counted: its HTTP status, else its outcome."""
    if result.outcome is Outcome.HTTP_ERROR and result.status is not None:
        return str(result.status)
    return result.outcome.value


def slo_target(ttft_slo_s: float | None, tpot_slo_s: float | None) -> SLOTarget | None:
    """The target attainment is checked against (a missing one never misses); ValueError unless positive."""
    for flag, value in (("--ttft-slo", ttft_slo_s), ("--tpot-slo", tpot_slo_s)):
        if value is not None and not value > 0:  # `not >` also rejects NaN
            raise ValueError(f"{flag} must be a positive number of seconds, got {value:g}")
    if ttft_slo_s is None and tpot_slo_s is None:
        return None
    return SLOTarget(
        ttft_s=ttft_slo_s if ttft_slo_s is not None else math.inf,
        tpot_s=tpot_slo_s if tpot_slo_s is not None else math.inf,
    )


def slo_attainment(results: Sequence[RequestResult], ttft_slo_s: float | None, tpot_slo_s: float | None) -> float | None:
    """Fraction of all requests that succeeded within both targets (``None`` without targets or requests)."""
    target = slo_target(ttft_slo_s, tpot_slo_s)
    if target is None or not results:
        return None
    good = 0
    for result in results:
        latency = latency_of(result)
        good += latency is not None and meets(latency, target)
    return good / len(results)


def summarize(
    results: Sequence[RequestResult], ttft_slo_s: float | None = None, tpot_slo_s: float | None = None
) -> BenchReport:
    """The report of one run."""
    latencies = [lat for lat in (latency_of(r) for r in results) if lat is not None]
    ends = [r.sent_s + r.e2e_s for r in results if r.e2e_s is not None]
    duration_s = max(ends) if ends else 0.0
    output_tokens = sum(lat.output_tokens for lat in latencies)
    errors = Counter(error_key(r) for r in results if r.outcome is not Outcome.OK)
    return BenchReport(
        num_requests=len(results),
        num_ok=len(latencies),
        errors=dict(sorted(errors.items())),
        duration_s=duration_s,
        request_throughput_per_s=len(latencies) / duration_s if duration_s > 0 else 0.0,
        output_tokens_per_s=output_tokens / duration_s if duration_s > 0 else 0.0,
        ttft=distribution([lat.ttft_s for lat in latencies]),
        tpot=distribution([lat.tpot_s for lat in latencies if lat.output_tokens > 1]),
        e2e=distribution([lat.e2e_s for lat in latencies]),
        ttft_slo_s=ttft_slo_s,
        tpot_slo_s=tpot_slo_s,
        slo_attainment=slo_attainment(results, ttft_slo_s, tpot_slo_s),
    )


def _row(name: str, dist: Distribution | None) -> str:
    if dist is None:
        return f"{name:<6} {'-':>10} {'-':>10} {'-':>10} {'-':>10}"
    ms = [dist.mean_s * 1e3, dist.p50_s * 1e3, dist.p90_s * 1e3, dist.p99_s * 1e3]
    return f"{name:<6} " + " ".join(f"{v:>10.1f}" for v in ms)


def format_report(report: BenchReport) -> str:
    """The human-readable summary ``pdserve bench`` prints."""
    lines = [
        f"requests: {report.num_requests}  ok: {report.num_ok}  "
        f"failed: {report.num_requests - report.num_ok}",
        f"duration: {report.duration_s:.1f} s  throughput: {report.request_throughput_per_s:.2f} req/s, "
        f"{report.output_tokens_per_s:.1f} output tok/s",
        f"{'(ms)':<6} {'mean':>10} {'p50':>10} {'p90':>10} {'p99':>10}",
        _row("TTFT", report.ttft),
        _row("TPOT", report.tpot),
        _row("e2e", report.e2e),
    ]
    if report.errors:
        lines.append("errors: " + ", ".join(f"{key}: {count}" for key, count in report.errors.items()))
    if report.slo_attainment is not None:
        ttft = "-" if report.ttft_slo_s is None else f"{report.ttft_slo_s * 1e3:g} ms"
        tpot = "-" if report.tpot_slo_s is None else f"{report.tpot_slo_s * 1e3:g} ms"
        lines.append(f"SLO attainment (TTFT <= {ttft}, TPOT <= {tpot}): {report.slo_attainment:.1%}")
    return "\n".join(lines)


def report_json(report: BenchReport, results: Sequence[RequestResult], config: dict[str, Any]) -> dict[str, Any]:
    """The JSON document ``pdserve bench`` writes: config, summary and one row per request."""
    rows = []
    for result in results:
        row = asdict(result)
        row["outcome"] = result.outcome.value
        latency = latency_of(result)
        row["tpot_s"] = latency.tpot_s if latency is not None and latency.output_tokens > 1 else None
        rows.append(row)
    return {"config": config, "summary": asdict(report), "requests": rows}
