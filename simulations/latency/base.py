"""The latency-model interface every instance model calls once per engine step.

A step runs some prefill tokens (whole prompts or chunks) and one token for
each running decode. Models see only aggregate shape, which is what makes a
step O(1) to cost regardless of batch size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class BatchShape:
    """Aggregate shape of one engine step."""

    prefill_tokens: int = 0  # new prompt tokens computed this step (sum over chunks)
    prefill_tokens_sq: int = 0  # sum of chunk_len * (chunk_len + cached_context): attention cost
    prefill_requests: int = 0
    decode_requests: int = 0  # running decodes, one token each
    decode_context_tokens: int = 0  # sum of their context lengths (KV read per step)

    @property
    def is_empty(self) -> bool:
        """Whether the step does no work."""
        return self.prefill_tokens == 0 and self.decode_requests == 0


class LatencyModel(Protocol):
    """Predicts the wall time of one engine step on one instance."""

    def step_time_s(self, shape: BatchShape, tp_degree: int = 1) -> float:
        """Seconds one step of ``shape`` takes with tensor parallelism ``tp_degree``."""
        ...


@runtime_checkable
class DecodeRunLatency(Protocol):
    """Optional capability: total time of ``steps`` consecutive pure-decode steps."""

    def decode_run_time_s(
        self, decode_requests: int, context_tokens: int, steps: int, tp_degree: int = 1
    ) -> float:
        """Sum over i < steps of step_time_s(decode_requests, context_tokens + i * decode_requests)."""
        ...
