"""What a run records while it runs: per-request outcomes, token gaps, busy time.

Per request only fixed-size columns are kept (TTFT, e2e, status), so a run of
a million requests costs tens of MB. Token gaps (time between tokens, TBT) go
into a log-binned histogram instead of a list: with step-batched decodes the
gap of every running request equals the step time, so one step adds one
weighted sample, not one per token.
"""

from __future__ import annotations

import math
from enum import IntEnum

import numpy as np
import numpy.typing as npt

# Defined outside this module so it can be compiled (see simulations.native).
from simulations.sim.errors import ConservationError

__all__ = ["ConservationError", "GapHistogram", "Recorder", "RequestStatus"]


class RequestStatus(IntEnum):
    """Terminal state of a request; every request ends in exactly one."""

    PENDING = 0
    FINISHED = 1
    REJECTED = 2


class GapHistogram:
    """Log-binned histogram of token gaps in seconds (bins are 10**(1/per_decade) wide)."""

    __slots__ = ("lo_exp", "per_decade", "counts", "total_weight", "weighted_sum_s", "max_s", "_edges_s")

    def __init__(self, lo_exp: int = -6, hi_exp: int = 4, per_decade: int = 100) -> None:
        self.lo_exp = lo_exp
        self.per_decade = per_decade
        self.counts = [0.0] * ((hi_exp - lo_exp) * per_decade + 1)
        self.total_weight = 0.0
        self.weighted_sum_s = 0.0
        self.max_s = 0.0
        # Lower edge of every bin (and the top edge of the last), computed once.
        self._edges_s = [10.0 ** (lo_exp + b / per_decade) for b in range(len(self.counts) + 1)]

    def _bin(self, value_s: float) -> int:
        if value_s <= 0.0:
            return 0
        b = int((math.log10(value_s) - self.lo_exp) * self.per_decade)
        if b < 0:
            return 0
        last = len(self.counts) - 1
        return b if b < last else last

    def bin_value_s(self, b: int) -> float:
        """Geometric centre of bin ``b``."""
        return float(10.0 ** (self.lo_exp + (b + 0.5) / self.per_decade))

    def add(self, value_s: float, weight: float = 1.0) -> None:
        """Record ``weight`` gaps of ``value_s`` seconds."""
        counts = self.counts
        if value_s <= 0.0:
            b = 0
        else:  # _bin, inline on the hot path
            b = int((math.log10(value_s) - self.lo_exp) * self.per_decade)
            if b < 0:
                b = 0
            elif b >= len(counts):
                b = len(counts) - 1
        counts[b] += weight
        self.total_weight += weight
        self.weighted_sum_s += value_s * weight
        if value_s > self.max_s:
            self.max_s = value_s

    def add_range(self, first_s: float, last_s: float, weight: float, mean_s: float | None = None) -> None:
        """Record ``weight`` gaps spread evenly between ``first_s`` and ``last_s`` (exact for linear growth).

        ``mean_s``, when known exactly, is used for the running sum instead of the midpoint.
        """
        lo, hi = (first_s, last_s) if first_s <= last_s else (last_s, first_s)
        b_lo = self._bin(lo)
        b_hi = self._bin(hi)
        if b_lo == b_hi:
            self.counts[b_lo] += weight
        else:
            span = hi - lo
            edges = self._edges_s
            counts = self.counts
            for b in range(b_lo, b_hi + 1):
                edge_lo = max(lo, edges[b])
                edge_hi = min(hi, edges[b + 1])
                if edge_hi > edge_lo:
                    counts[b] += weight * (edge_hi - edge_lo) / span
        self.total_weight += weight
        self.weighted_sum_s += (0.5 * (lo + hi) if mean_s is None else mean_s) * weight
        if hi > self.max_s:
            self.max_s = hi

    def quantile_s(self, q: float) -> float:
        """Approximate q-quantile (0..1) at bin resolution; 0.0 when empty."""
        if self.total_weight <= 0:
            return 0.0
        target = q * self.total_weight
        acc = 0.0
        for b, c in enumerate(self.counts):
            acc += c
            if acc >= target and c > 0:
                return self.bin_value_s(b)
        return self.max_s

    def worst_mean_s(self, fraction: float = 0.1) -> float:
        """Mean of the largest ``fraction`` of all gaps (Mooncake's tail metric), at bin resolution."""
        if self.total_weight <= 0:
            return 0.0
        need = fraction * self.total_weight
        taken = 0.0
        acc_s = 0.0
        for b in range(len(self.counts) - 1, -1, -1):
            c = self.counts[b]
            if c <= 0:
                continue
            take = min(c, need - taken)
            acc_s += take * min(self.bin_value_s(b), self.max_s)
            taken += take
            if taken >= need:
                break
        return acc_s / taken if taken else 0.0


class BusyTimeline:
    """Busy seconds per fixed-width time bucket (for utilisation over time)."""

    __slots__ = ("bucket_s", "busy_s")

    def __init__(self, bucket_s: float) -> None:
        if bucket_s <= 0:
            raise ValueError(f"bucket_s must be positive, got {bucket_s}")
        self.bucket_s = bucket_s
        self.busy_s: list[float] = []

    def add(self, start_s: float, end_s: float) -> None:
        """Mark ``[start_s, end_s)`` busy."""
        width = self.bucket_s
        b = int(start_s / width)
        last = int(end_s / width)
        busy = self.busy_s
        if last >= len(busy):
            busy.extend([0.0] * (last + 1 - len(busy)))
        if b == last:
            busy[b] += end_s - start_s
            return
        busy[b] += (b + 1) * width - start_s
        for mid in range(b + 1, last):
            busy[mid] += width
        busy[last] += end_s - last * width

    def utilisation(self, num_buckets: int) -> npt.NDArray[np.float64]:
        """Busy fraction per bucket, padded with zeros to ``num_buckets``."""
        out = np.zeros(num_buckets)
        n = min(num_buckets, len(self.busy_s))
        out[:n] = np.asarray(self.busy_s[:n]) / self.bucket_s
        return np.clip(out, 0.0, 1.0)


class Recorder:
    """Per-request outcome columns plus the shared gap histogram of one run.

    Columns are plain lists / a bytearray while the run is hot (numpy item
    access is several times slower); ``arrays()`` converts them once.
    """

    __slots__ = ("ttft_s", "e2e_s", "status", "preemptions", "gaps", "rejected_reason", "ended")

    def __init__(self, num_requests: int) -> None:
        nan = float("nan")
        self.ttft_s = [nan] * num_requests
        self.e2e_s = [nan] * num_requests
        self.status = bytearray(num_requests)  # RequestStatus values
        self.preemptions = [0] * num_requests
        self.gaps = GapHistogram()
        self.rejected_reason: dict[str, int] = {}
        self.ended = 0  # requests finished or rejected so far

    def first_token(self, idx: int, ttft_s: float) -> None:
        """Record the first token of request ``idx`` (only the first one counts)."""
        if self.ttft_s[idx] != self.ttft_s[idx]:  # NaN: not set yet
            self.ttft_s[idx] = ttft_s

    def finish(self, idx: int, e2e_s: float) -> None:
        """Record that request ``idx`` completed; completing twice is a conservation error."""
        if self.status[idx]:
            raise ConservationError(f"request {idx} completed twice")
        self.status[idx] = 1  # RequestStatus.FINISHED
        self.e2e_s[idx] = e2e_s
        self.ended += 1

    def reject(self, idx: int, reason: str) -> None:
        """Record an explicit rejection of request ``idx`` with ``reason``."""
        if self.status[idx]:
            raise ConservationError(f"request {idx} rejected after it ended")
        self.status[idx] = RequestStatus.REJECTED
        self.rejected_reason[reason] = self.rejected_reason.get(reason, 0) + 1
        self.ended += 1

    def check_conservation(self) -> None:
        """Raise unless every request ended exactly once."""
        pending = self.status.count(RequestStatus.PENDING)
        if pending:
            raise ConservationError(f"{pending} requests never finished nor were rejected")

    def arrays(self) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float64], npt.NDArray[np.float64],
                              npt.NDArray[np.int32]]:
        """(status, ttft_s, e2e_s, preemptions) as numpy arrays."""
        return (np.frombuffer(bytes(self.status), dtype=np.int8).copy(), np.asarray(self.ttft_s, dtype=np.float64),
                np.asarray(self.e2e_s, dtype=np.float64), np.asarray(self.preemptions, dtype=np.int32))
