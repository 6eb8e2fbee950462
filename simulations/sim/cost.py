"""Step costs: one engine step, or a run of identical-batch decode steps.

Decode-only steps of an unchanged batch differ only in context length, which
grows by the batch size every step. A latency model may offer the optional
``DecodeRunLatency`` capability (an exact closed form for the total of such a
run); the shipped models get one from ``runcost``; any other model is costed
step by step through ``step_time_s`` — identical results, only slower.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable

# DecodeRunLatency lives with the model interface: a runtime-checkable Protocol cannot be compiled.
from simulations.latency.base import BatchShape, DecodeRunLatency, LatencyModel
from simulations.sim.runcost import closed_form_runs_at

__all__ = ["STEP_MEMO_ENTRIES", "DecodeRunLatency", "StepCoster"]

# Most memoized step shapes one StepCoster keeps (a few MB).
STEP_MEMO_ENTRIES = 1 << 16


class StepCoster:
    """Costs steps on one instance (fixed tensor-parallel degree) with one latency model."""

    __slots__ = ("model", "tp_degree", "_run", "_step", "_cum_key", "_cum", "_steps_s", "run_s")

    def __init__(self, model: LatencyModel, tp_degree: int, use_closed_form: bool = True) -> None:
        if tp_degree < 1:
            raise ValueError(f"tp_degree must be >= 1, got {tp_degree}")
        self.model = model
        self.tp_degree = tp_degree
        self._step = model.step_time_s
        self._run = closed_form_runs_at(model, tp_degree) if use_closed_form else None
        # run_s(batch, context_tokens, steps): seconds of ``steps`` decode steps of ``batch``
        # requests starting at ``context_tokens`` — the closed form itself when there is one
        # (called a few times per decode run, so no wrapper), else summed step by step.
        self.run_s: Callable[[int, int, int], float] = self._run if self._run is not None else self._run_by_steps
        self._cum_key: tuple[int, int] = (-1, -1)
        self._cum: list[float] = []
        # Step times by shape fields. A latency model is a pure function of the shape, and tiled
        # traces repeat prompt lengths, so most prefill steps are costed once.
        self._steps_s: dict[tuple[int, int, int, int, int], float] = {}

    @property
    def has_closed_form(self) -> bool:
        """Whether decode runs are costed in O(1) by the model itself."""
        return self._run is not None

    def step_s(self, shape: BatchShape) -> float:
        """Seconds of one step of ``shape``."""
        dt = self._step(shape, self.tp_degree)
        if dt < 0:
            raise ValueError(f"latency model returned a negative step time {dt} for {shape}")
        return dt

    def mixed_step_s(self, prefill_tokens: int, prefill_tokens_sq: int, prefill_requests: int,
                     decode_requests: int, decode_context_tokens: int) -> float:
        """``step_s`` of the shape with these fields, memoized (at most ``STEP_MEMO_ENTRIES`` kept)."""
        key = (prefill_tokens, prefill_tokens_sq, prefill_requests, decode_requests, decode_context_tokens)
        memo = self._steps_s
        dt = memo.get(key)
        if dt is None:
            dt = self.step_s(BatchShape(
                prefill_tokens=prefill_tokens, prefill_tokens_sq=prefill_tokens_sq, prefill_requests=prefill_requests,
                decode_requests=decode_requests, decode_context_tokens=decode_context_tokens,
            ))
            if len(memo) >= STEP_MEMO_ENTRIES:
                memo.clear()  # bounds memory; costs are recomputed identically
            memo[key] = dt
        return dt

    def _cumulative(self, batch: int, context_tokens: int, steps: int) -> list[float]:
        # Cached per (batch, start context): a run is costed, then maybe cut.
        if self._cum_key != (batch, context_tokens) or len(self._cum) < steps:
            cum: list[float] = []
            total = 0.0
            step = self._step
            tp = self.tp_degree
            for i in range(steps):
                total += step(BatchShape(decode_requests=batch, decode_context_tokens=context_tokens + i * batch), tp)
                cum.append(total)
            self._cum_key = (batch, context_tokens)
            self._cum = cum
        return self._cum

    def _run_by_steps(self, batch: int, context_tokens: int, steps: int) -> float:
        """``run_s`` without a closed form: the sum of single steps."""
        if steps == 1:
            return self.step_s(BatchShape(decode_requests=batch, decode_context_tokens=context_tokens))
        return self._cumulative(batch, context_tokens, steps)[steps - 1]

    def steps_by(self, batch: int, context_tokens: int, steps: int, elapsed_s: float) -> int:
        """Smallest j in [1, steps] whose run end ``run_s(.., j)`` is at or after ``elapsed_s``."""
        if self._run is None:
            j = bisect_left(self._cumulative(batch, context_tokens, steps), elapsed_s, 0, steps) + 1
            return min(j, steps)
        # Steps only lengthen within a run, so elapsed / first step bounds j from above and
        # elapsed / last step from below; bisect in that (usually tiny) range.
        first_s = self.run_s(batch, context_tokens, 1)
        last_s = self.run_s(batch, context_tokens + (steps - 1) * batch, 1)
        hi = steps if first_s <= 0 else min(steps, max(1, math.ceil(elapsed_s / first_s)))
        lo = 1 if last_s <= 0 else min(hi, max(1, math.floor(elapsed_s / last_s)))
        while lo < hi:
            mid = (lo + hi) // 2
            if self.run_s(batch, context_tokens, mid) >= elapsed_s:
                hi = mid
            else:
                lo = mid + 1
        return lo
