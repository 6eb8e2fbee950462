"""Small latency models for simulator tests (affine in the batch shape, or constant)."""

from __future__ import annotations

from simulations.latency.base import BatchShape


class AffineModel:
    """step = (base + prefill_token*P + decode_request*B + context_token*C) / tp; idle steps cost 0."""

    def __init__(self, base_s: float = 0.005, prefill_token_s: float = 1e-4, decode_request_s: float = 2e-4,
                 context_token_s: float = 1e-7, closed_form: bool = True) -> None:
        self.base_s = base_s
        self.prefill_token_s = prefill_token_s
        self.decode_request_s = decode_request_s
        self.context_token_s = context_token_s
        if closed_form:
            self.decode_run_time_s = self._decode_run_time_s

    def step_time_s(self, shape: BatchShape, tp_degree: int = 1) -> float:
        if shape.is_empty:
            return 0.0
        return (self.base_s + self.prefill_token_s * shape.prefill_tokens
                + self.decode_request_s * shape.decode_requests
                + self.context_token_s * shape.decode_context_tokens) / tp_degree

    def _decode_run_time_s(self, decode_requests: int, context_tokens: int, steps: int, tp_degree: int = 1) -> float:
        per_step = self.base_s + self.decode_request_s * decode_requests + self.context_token_s * context_tokens
        growth = self.context_token_s * decode_requests * steps * (steps - 1) / 2
        return (per_step * steps + growth) / tp_degree


class ConstantModel:
    """Every non-empty step takes ``step_s`` seconds."""

    def __init__(self, step_s: float) -> None:
        self.step_s = step_s

    def step_time_s(self, shape: BatchShape, tp_degree: int = 1) -> float:
        return 0.0 if shape.is_empty else self.step_s
