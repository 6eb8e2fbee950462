"""Trivial latency models for tests: every step free, or every non-empty step a fixed time."""

from __future__ import annotations

from dataclasses import dataclass

from simulations.latency.base import BatchShape


@dataclass(frozen=True, slots=True)
class ZeroLatency:
    """Every step takes no time."""

    def step_time_s(self, shape: BatchShape, tp_degree: int = 1) -> float:
        """Always 0."""
        return 0.0


@dataclass(frozen=True, slots=True)
class FixedLatency:
    """Every non-empty step takes ``step_s`` regardless of shape and parallelism; empty steps 0."""

    step_s: float

    def __post_init__(self) -> None:
        if self.step_s < 0:
            raise ValueError(f"step_s must be >= 0, got {self.step_s}")

    def step_time_s(self, shape: BatchShape, tp_degree: int = 1) -> float:
        """``step_s`` for a step with work, else 0."""
        return 0.0 if shape.is_empty else self.step_s
