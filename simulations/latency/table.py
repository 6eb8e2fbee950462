"""Interpolation-table latency model over a profiled grid.

- prefill: Σ prompt tokens of the step -> seconds, piecewise linear.
- decode: (batch, mean context per request = Σcontext / batch) -> seconds,
  bilinear on a full rectangular grid.

Outside the grid: below the smallest point a coordinate is clamped (small
steps cost what the smallest measured one did: the fixed cost dominates);
above the largest point the last segment is extended linearly with a slope
>= 0 (time keeps growing at the marginal cost measured at the edge; in 2-D
each axis is extended from the clamped point, cross terms ignored).

A mixed step is ``prefill + decode - shared``, and tensor parallelism
follows ``tp.TpScaling`` with ``shared`` as the fixed part; ``shared`` is
the smaller intercept of a regression fitted to the same samples (an
estimate of the per-step cost that does not shrink with more GPUs).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from simulations.latency.base import BatchShape
from simulations.latency.regression import DecodeSample, PrefillSample, fit_regression
from simulations.latency.tp import TpScaling

Array = npt.NDArray[np.float64]


def _segment(grid: Array, x: float) -> tuple[int, float]:
    """Index i and weight w with x ≈ grid[i] * (1 - w) + grid[i + 1] * w, x clamped into the grid."""
    if len(grid) == 1:
        return 0, 0.0
    x = min(max(x, float(grid[0])), float(grid[-1]))
    i = min(int(np.searchsorted(grid, x, side="right")) - 1, len(grid) - 2)
    return i, (x - float(grid[i])) / float(grid[i + 1] - grid[i])


def _edge_slope(grid: Array, values: Array) -> float:
    if len(grid) < 2:
        return 0.0
    return max(float(values[-1] - values[-2]) / float(grid[-1] - grid[-2]), 0.0)


@dataclass(frozen=True, eq=False)
class TableLatency:
    """Linear / bilinear interpolation over profiled step times; see the module docstring."""

    prefill_tokens: Array  # increasing grid
    prefill_s: Array
    decode_batch: Array  # increasing grid
    decode_context: Array  # increasing grid, mean context per request
    decode_s: Array  # shape (len(decode_batch), len(decode_context))
    shared_s: float = 0.0
    tp: TpScaling = field(default_factory=TpScaling)

    def __post_init__(self) -> None:
        for name, grid in (
            ("prefill_tokens", self.prefill_tokens),
            ("decode_batch", self.decode_batch),
            ("decode_context", self.decode_context),
        ):
            if len(grid) == 0 or np.any(np.diff(grid) <= 0):
                raise ValueError(f"{name} grid must be non-empty and strictly increasing")
        if self.prefill_s.shape != self.prefill_tokens.shape:
            raise ValueError("prefill_s must match the prefill_tokens grid")
        if self.decode_s.shape != (len(self.decode_batch), len(self.decode_context)):
            raise ValueError("decode_s must have shape (len(decode_batch), len(decode_context))")

    def prefill_time_s(self, tokens: float) -> float:
        """Seconds of a prefill-only step of ``tokens`` prompt tokens, one GPU."""
        grid, vals = self.prefill_tokens, self.prefill_s
        i, w = _segment(grid, tokens)
        base = float(vals[i]) if len(grid) == 1 else float(vals[i] * (1 - w) + vals[i + 1] * w)
        if tokens > grid[-1]:
            base += _edge_slope(grid, vals) * (tokens - float(grid[-1]))
        return base

    def decode_time_s(self, batch: float, context_per_request: float) -> float:
        """Seconds of a decode-only step, one GPU."""
        bg, cg, v = self.decode_batch, self.decode_context, self.decode_s
        bi, bw = _segment(bg, batch)
        ci, cw = _segment(cg, context_per_request)
        b1, c1 = min(bi + 1, len(bg) - 1), min(ci + 1, len(cg) - 1)
        base = float(
            v[bi, ci] * (1 - bw) * (1 - cw)
            + v[b1, ci] * bw * (1 - cw)
            + v[bi, c1] * (1 - bw) * cw
            + v[b1, c1] * bw * cw
        )
        if batch > bg[-1]:
            col = v[:, ci] * (1 - cw) + v[:, c1] * cw
            base += _edge_slope(bg, col) * (batch - float(bg[-1]))
        if context_per_request > cg[-1]:
            row = v[bi, :] * (1 - bw) + v[b1, :] * bw
            base += _edge_slope(cg, row) * (context_per_request - float(cg[-1]))
        return base

    def step_time_s(self, shape: BatchShape, tp_degree: int = 1) -> float:
        """Seconds one step of ``shape`` takes with tensor parallelism ``tp_degree``."""
        if shape.is_empty:
            return 0.0
        total_s = 0.0
        if shape.prefill_tokens > 0:
            total_s += self.prefill_time_s(shape.prefill_tokens)
        if shape.decode_requests > 0:
            total_s += self.decode_time_s(
                shape.decode_requests, shape.decode_context_tokens / shape.decode_requests
            )
        if shape.prefill_tokens > 0 and shape.decode_requests > 0:
            total_s -= self.shared_s
        overhead_s = min(self.shared_s, total_s)
        tokens = shape.prefill_tokens + shape.decode_requests
        return self.tp.step_time_s(overhead_s, total_s - overhead_s, tokens, tp_degree)


def table_from_samples(
    prefill: Sequence[PrefillSample], decode: Sequence[DecodeSample], tp: TpScaling | None = None
) -> TableLatency:
    """Build the grid from profile samples (median of repeats); decode samples must fill a full grid."""
    if not prefill or not decode:
        raise ValueError("a table needs both prefill and decode samples")
    by_tokens: dict[int, list[float]] = defaultdict(list)
    for p in prefill:
        by_tokens[p.tokens].append(p.seconds)
    tokens = sorted(by_tokens)
    by_cell: dict[tuple[int, int], list[float]] = defaultdict(list)
    for d in decode:
        if d.batch < 1:
            raise ValueError(f"decode sample with batch {d.batch}")
        by_cell[(d.batch, round(d.context / d.batch))].append(d.seconds)
    batches = sorted({b for b, _ in by_cell})
    contexts = sorted({c for _, c in by_cell})
    missing = [(b, c) for b in batches for c in contexts if (b, c) not in by_cell]
    if missing:
        raise ValueError(f"decode samples do not fill the (batch, context) grid; missing {missing[:5]}")
    fit = fit_regression(prefill, decode).model
    return TableLatency(
        prefill_tokens=np.array(tokens, dtype=np.float64),
        prefill_s=np.array([np.median(by_tokens[t]) for t in tokens], dtype=np.float64),
        decode_batch=np.array(batches, dtype=np.float64),
        decode_context=np.array(contexts, dtype=np.float64),
        decode_s=np.array(
            [[np.median(by_cell[(b, c)]) for c in contexts] for b in batches], dtype=np.float64
        ),
        shared_s=min(fit.prefill_fixed_s, fit.decode_fixed_s),
        tp=tp or TpScaling(),
    )
