"""Workloads and control policies shared by simulator tests and the compiled-vs-pure probe."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from orchestrator.core.types import ClusterSnapshot, InstanceHealth
from simulations.sim.cluster import ControlDecision, SetHealth
from simulations.traces.trace import Trace


class FlappingHealth:
    """Drains one instance every few ticks and restores it later."""

    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id
        self.ticks = 0

    def decide(self, snapshot: ClusterSnapshot, now_s: float) -> Sequence[ControlDecision]:
        self.ticks += 1
        if self.ticks % 5 == 2:
            return [SetHealth(self.instance_id, InstanceHealth.DRAINING)]
        if self.ticks % 5 == 4:
            return [SetHealth(self.instance_id, InstanceHealth.HEALTHY)]
        return []


def random_trace(n: int, rate_rps: float, seed: int, max_prompt: int = 3000, max_output: int = 400) -> Trace:
    """Poisson arrivals at ``rate_rps``; prompt and output lengths uniform below ``max_prompt`` / ``max_output``."""
    rng = np.random.default_rng(seed)
    return Trace("t", np.cumsum(rng.exponential(1 / rate_rps, n)), rng.integers(1, max_prompt, n),
                 rng.integers(1, max_output, n))
