"""SLO targets and the arithmetic of meeting them.

Definitions follow DistServe: TTFT is arrival to first token; TPOT is the mean
time per output token after the first, ``(e2e - ttft) / (output_tokens - 1)``;
a request *attains* its SLO when it meets both targets; attainment is the
fraction of requests that do.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum


class OverloadAction(str, Enum):
    """What admission does with a request when no instance has room."""

    REJECT = "reject"
    QUEUE = "queue"
    DEGRADE = "degrade"


@dataclass(frozen=True, slots=True)
class SLOTarget:
    """Latency targets of one SLO class (seconds) and the attainment goal."""

    ttft_s: float
    tpot_s: float
    attainment: float = 0.9

    def __post_init__(self) -> None:
        if self.ttft_s <= 0 or self.tpot_s <= 0:
            raise ValueError(f"SLO targets must be positive: ttft_s={self.ttft_s}, tpot_s={self.tpot_s}")
        if not 0.0 < self.attainment <= 1.0:
            raise ValueError(f"attainment must be in (0, 1], got {self.attainment}")


@dataclass(frozen=True, slots=True)
class SLOClass:
    """A named class of traffic with its targets and overload behaviour."""

    name: str
    target: SLOTarget
    priority: int = 0
    on_overload: OverloadAction = OverloadAction.REJECT


@dataclass(frozen=True, slots=True)
class RequestLatency:
    """Measured latencies of one finished request."""

    ttft_s: float
    e2e_s: float
    output_tokens: int

    @property
    def tpot_s(self) -> float:
        """Mean time per output token after the first (0 for single-token outputs)."""
        if self.output_tokens <= 1:
            return 0.0
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def tpot_s(ttft_s: float, e2e_s: float, output_tokens: int) -> float:
    """DistServe TPOT: decode time divided by the tokens after the first."""
    return RequestLatency(ttft_s, e2e_s, output_tokens).tpot_s


def meets(latency: RequestLatency, target: SLOTarget) -> bool:
    """Whether one request met both its TTFT and TPOT targets."""
    return latency.ttft_s <= target.ttft_s and latency.tpot_s <= target.tpot_s


def attainment(latencies: Iterable[RequestLatency], target: SLOTarget) -> float:
    """Fraction of requests meeting both targets (0.0 for no requests)."""
    total = 0
    good = 0
    for lat in latencies:
        total += 1
        good += meets(lat, target)
    return good / total if total else 0.0


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation, like numpy's default."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must be within [0, 100], got {q}")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    frac = pos - lo
    return ordered[lo] + (ordered[hi] - ordered[lo]) * frac
