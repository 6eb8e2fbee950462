"""Closed forms for the total time of a decode run, for the shipped latency models.

A decode run is ``k`` steps of the same ``B`` requests, context growing by
``B`` per step: ``C_i = C + i * B``. For models whose decode step time is
affine in context (regression profiles, fixed, zero) the run is an
arithmetic series; for the roofline it is the sum of ``max(compute_i,
memory_i)`` with both terms affine in ``i``, i.e. two arithmetic series
split where the lines cross. Each form is checked against step-by-step
summation in ``tests/sim/test_runcost.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from simulations.latency.base import BatchShape, LatencyModel
from simulations.latency.regression import RegressionLatency
from simulations.latency.roofline import RooflineLatency
from simulations.latency.trivial import FixedLatency, ZeroLatency

RunFn = Callable[[int, int, int, int], float]  # (batch, context_tokens, steps, tp_degree) -> seconds
TpRunFn = Callable[[int, int, int], float]  # the same at one TP degree


def _series(first: float, step: float, i0: int, i1: int) -> float:
    """Σ_{i=i0}^{i1-1} (first + step * i)."""
    n = i1 - i0
    if n <= 0:
        return 0.0
    return n * first + step * n * (i0 + i1 - 1) / 2.0


def _affine_runs(model: LatencyModel) -> RunFn:
    def run(batch: int, context_tokens: int, steps: int, tp_degree: int = 1) -> float:
        s0 = model.step_time_s(BatchShape(decode_requests=batch, decode_context_tokens=context_tokens), tp_degree)
        if steps == 1:
            return s0
        s1 = model.step_time_s(
            BatchShape(decode_requests=batch, decode_context_tokens=context_tokens + batch), tp_degree
        )
        return _series(s0, s1 - s0, 0, steps)

    return run


def _roofline_runs_at(model: RooflineLatency, tp_degree: int) -> TpRunFn:
    # For a fixed batch and TP degree, compute and memory time are affine in context:
    # coefficients are derived once per batch from the model's own flops/bytes.
    coefficients: dict[int, tuple[float, float, float, float, float]] = {}

    def coeffs(batch: int) -> tuple[float, float, float, float, float]:
        found = coefficients.get(batch)
        if found is None:
            shape0 = BatchShape(decode_requests=batch, decode_context_tokens=0)
            shape1 = BatchShape(decode_requests=batch, decode_context_tokens=1)
            compute_div = tp_degree * model.gpu.peak_tflops * 1e12 * model.mfu
            memory_div = tp_degree * model.gpu.memory_bandwidth_gbps * 1e9 * model.mbu
            c0 = model.flops(shape0) / compute_div
            m0 = model.bytes_moved(shape0) / memory_div
            found = (c0, model.flops(shape1) / compute_div - c0, m0, model.bytes_moved(shape1) / memory_div - m0,
                     model.overhead_s + model.comm_time_s(shape0, tp_degree))
            coefficients[batch] = found
        return found

    def run(batch: int, context_tokens: int, steps: int) -> float:
        found = coefficients.get(batch)
        c_int, c_slope, m_int, m_slope, fixed = coeffs(batch) if found is None else found
        c0 = c_int + c_slope * context_tokens
        m0 = m_int + m_slope * context_tokens
        if steps == 1:
            # What the general form below reduces to for one step, bit for bit: the bound at i = 0.
            return fixed + (c0 if c0 >= m0 else m0)
        c_step = c_slope * batch
        m_step = m_slope * batch
        # Steps i < split have one bound, i >= split the other (the lines cross at most once).
        # The hot path: ``_series`` written out inline, operation for operation.
        if c_step == m_step:  # parallel lines: one bound throughout
            body = _series(c0, c_step, 0, steps) if c0 >= m0 else _series(m0, m_step, 0, steps)
        else:
            cross = (m0 - c0) / (c_step - m_step)  # compute == memory at i = cross
            split = min(steps, max(0, math.ceil(cross)))
            if c_step > m_step:  # compute grows faster: memory-bound first, compute-bound from split
                first, first_step, second, second_step = m0, m_step, c0, c_step
            else:
                first, first_step, second, second_step = c0, c_step, m0, m_step
            # _series(first, first_step, 0, split) + _series(second, second_step, split, steps)
            head = split * first + first_step * split * (split - 1) / 2.0 if split > 0 else 0.0
            n = steps - split
            tail = n * second + second_step * n * (split + steps - 1) / 2.0 if n > 0 else 0.0
            body = head + tail
        return steps * fixed + body

    return run


def _roofline_runs(model: RooflineLatency) -> RunFn:
    per_tp: dict[int, TpRunFn] = {}

    def run(batch: int, context_tokens: int, steps: int, tp_degree: int = 1) -> float:
        at_tp = per_tp.get(tp_degree)
        if at_tp is None:
            at_tp = per_tp[tp_degree] = _roofline_runs_at(model, tp_degree)
        return at_tp(batch, context_tokens, steps)

    return run


def closed_form_runs(model: LatencyModel) -> RunFn | None:
    """The decode-run closed form for ``model``, or None when it has none (costed step by step)."""
    own = getattr(model, "decode_run_time_s", None)
    if callable(own):
        return own  # type: ignore[no-any-return]
    if type(model) is RooflineLatency:
        return _roofline_runs(model)
    if type(model) in (RegressionLatency, FixedLatency, ZeroLatency):
        return _affine_runs(model)
    return None


def closed_form_runs_at(model: LatencyModel, tp_degree: int) -> TpRunFn | None:
    """``closed_form_runs`` at one TP degree, returning floats; None when ``model`` has no closed form."""
    if type(model) is RooflineLatency and not callable(getattr(model, "decode_run_time_s", None)):
        return _roofline_runs_at(model, tp_degree)  # the hot path: no per-call dispatch
    run = closed_form_runs(model)
    if run is None:
        return None

    def at_tp(batch: int, context_tokens: int, steps: int) -> float:
        return float(run(batch, context_tokens, steps, tp_degree))

    return at_tp
