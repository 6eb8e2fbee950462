"""Trace transformations; each returns a new ``Trace`` and leaves its input untouched.

- ``scale_rate(t, f)``: arrivals divided by ``f`` (f = 2 doubles the rate).
- ``time_window(t, start_s, end_s)``: rows with ``start_s <= arrival < end_s``,
  re-based so the window starts at 0.
- ``head(t, n)``: the first ``n`` rows.
- ``sample_rows(t, n | fraction, seed)``: a random subset, time order kept.
- ``tile(t, n)``: copies back to back in time until ``n`` rows (then cut);
  combine with ``scale_rate`` to reach a target rate.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from simulations.traces.trace import Trace


def take_rows(trace: Trace, rows: npt.NDArray[np.intp] | slice, name: str | None = None) -> Trace:
    """The rows ``rows`` (already in time order) of ``trace``."""
    hash_ids = None
    if trace.hash_ids is not None:
        if isinstance(rows, slice):
            hash_ids = trace.hash_ids[rows]
        else:
            hash_ids = tuple(trace.hash_ids[int(i)] for i in rows)
    return Trace(
        name=name or trace.name,
        arrival_s=trace.arrival_s[rows],
        prompt_tokens=trace.prompt_tokens[rows],
        output_tokens=trace.output_tokens[rows],
        hash_ids=hash_ids,
        failed=None if trace.failed is None else trace.failed[rows],
    )


def scale_rate(trace: Trace, factor: float) -> Trace:
    """Compress time by ``factor`` (> 1: faster arrivals, < 1: slower)."""
    if not factor > 0:
        raise ValueError(f"rate factor must be > 0, got {factor}")
    return Trace(
        name=f"{trace.name}@x{factor:g}",
        arrival_s=trace.arrival_s / factor,
        prompt_tokens=trace.prompt_tokens,
        output_tokens=trace.output_tokens,
        hash_ids=trace.hash_ids,
        failed=trace.failed,
    )


def time_window(trace: Trace, start_s: float, end_s: float) -> Trace:
    """Rows arriving in ``[start_s, end_s)``, with arrivals re-based to ``start_s``."""
    if end_s < start_s:
        raise ValueError(f"window end {end_s} is before its start {start_s}")
    lo, hi = np.searchsorted(trace.arrival_s, [start_s, end_s], side="left")
    out = take_rows(trace, slice(int(lo), int(hi)), name=f"{trace.name}[{start_s:g}s,{end_s:g}s)")
    return Trace(
        out.name, out.arrival_s - start_s, out.prompt_tokens, out.output_tokens, out.hash_ids, out.failed
    )


def head(trace: Trace, num_requests: int) -> Trace:
    """The first ``num_requests`` rows."""
    if num_requests < 0:
        raise ValueError(f"num_requests must be >= 0, got {num_requests}")
    return take_rows(trace, slice(0, num_requests))


def sample_rows(
    trace: Trace, num_requests: int | None = None, fraction: float | None = None, seed: int = 0
) -> Trace:
    """A uniformly random subset without replacement, given as a count or a fraction; order kept."""
    if (num_requests is None) == (fraction is None):
        raise ValueError("give exactly one of num_requests or fraction")
    if fraction is not None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        num_requests = round(fraction * len(trace))
    assert num_requests is not None
    if not 0 <= num_requests <= len(trace):
        raise ValueError(f"cannot sample {num_requests} rows from {len(trace)}")
    rows = np.sort(np.random.default_rng(seed).choice(len(trace), size=num_requests, replace=False))
    return take_rows(trace, rows, name=f"{trace.name}~{num_requests}")


def tile(trace: Trace, num_requests: int, distinct_hash_ids: bool = True) -> Trace:
    """Repeat ``trace`` back to back until it has ``num_requests`` rows.

    Copy k starts one mean inter-arrival gap after copy k-1's last arrival,
    so the seam looks like an ordinary gap. With ``distinct_hash_ids`` each
    copy's prefix-block ids are shifted so copies do not share prefix cache.
    """
    n = len(trace)
    if n == 0:
        raise ValueError(f"cannot tile empty trace {trace.name!r}")
    if num_requests < 0:
        raise ValueError(f"num_requests must be >= 0, got {num_requests}")
    copies = -(-num_requests // n)
    mean_gap_s = trace.duration_s / (n - 1) if n > 1 else 1.0
    period_s = trace.arrival_s[-1] - trace.arrival_s[0] + mean_gap_s
    base = trace.arrival_s - trace.arrival_s[0]
    arrival_s = (base[None, :] + period_s * np.arange(copies)[:, None]).ravel()[:num_requests]
    hash_ids = None
    if trace.hash_ids is not None:
        stride = 1 + max((max(h) for h in trace.hash_ids if h), default=0) if distinct_hash_ids else 0
        hash_ids = tuple(
            tuple(x + k * stride for x in trace.hash_ids[i]) if k else trace.hash_ids[i]
            for k in range(copies)
            for i in range(n)
        )[:num_requests]
    return Trace(
        name=f"{trace.name}*{num_requests}",
        arrival_s=arrival_s,
        prompt_tokens=np.tile(trace.prompt_tokens, copies)[:num_requests],
        output_tokens=np.tile(trace.output_tokens, copies)[:num_requests],
        hash_ids=hash_ids,
        failed=None if trace.failed is None else np.tile(trace.failed, copies)[:num_requests],
    )
