"""Supervision: which workers are routable, which to replace, which to start.

The controller probes every registered worker each round and feeds what it
saw here: whether the process is alive and how many health probes failed in a
row. A dead process is replaced at once; a live one that keeps failing probes
first leaves routing (UNHEALTHY) and, if it does not recover, is replaced too.
Pools below their target size get new workers. Replacements per round are
capped so a flapping node cannot trigger a storm of restarts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from orchestrator.core.types import InstanceHealth, Role


@dataclass(frozen=True, slots=True)
class SupervisionConfig:
    """Thresholds of the supervision policy."""

    # Consecutive failed probes before a live worker stops receiving new requests.
    unhealthy_after_failures: int = 2
    # Consecutive failed probes before a live worker is replaced (a dead one is replaced at once).
    replace_after_failures: int = 6
    # Replacements plus new starts per round at most.
    max_actions_per_round: int = 4

    def __post_init__(self) -> None:
        if self.unhealthy_after_failures < 1:
            raise ValueError(f"unhealthy_after_failures must be >= 1, got {self.unhealthy_after_failures}")
        if self.replace_after_failures < self.unhealthy_after_failures:
            raise ValueError("replace_after_failures must be >= unhealthy_after_failures")
        if self.max_actions_per_round < 1:
            raise ValueError(f"max_actions_per_round must be >= 1, got {self.max_actions_per_round}")


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    """What the controller observed about one registered worker this round."""

    instance_id: str
    role: Role
    alive: bool  # the process exists (its actor has not died)
    consecutive_failures: int = 0  # failed health probes in a row


@dataclass(frozen=True, slots=True)
class SupervisionPlan:
    """Health to publish per instance, instances to replace, and pools to grow."""

    health: tuple[tuple[str, InstanceHealth], ...]
    replace: tuple[str, ...] = ()
    start: tuple[Role, ...] = ()


def supervise(
    workers: Sequence[WorkerStatus], targets: Mapping[Role, int], config: SupervisionConfig
) -> SupervisionPlan:
    """Decide this round's health marks, replacements and new starts; deterministic in its inputs."""
    health: list[tuple[str, InstanceHealth]] = []
    replace: list[str] = []
    for worker in workers:
        if not worker.alive or worker.consecutive_failures >= config.replace_after_failures:
            replace.append(worker.instance_id)
            health.append((worker.instance_id, InstanceHealth.UNHEALTHY))
        elif worker.consecutive_failures >= config.unhealthy_after_failures:
            health.append((worker.instance_id, InstanceHealth.UNHEALTHY))
        else:
            health.append((worker.instance_id, InstanceHealth.HEALTHY))
    budget = config.max_actions_per_round
    replace = replace[:budget]
    budget -= len(replace)
    start: list[Role] = []
    # A worker being replaced keeps its slot, so it counts towards its pool's size.
    for role in sorted(targets, key=lambda r: r.value):
        have = sum(1 for w in workers if w.role is role)
        missing = max(0, targets[role] - have)
        take = min(missing, budget)
        start.extend([role] * take)
        budget -= take
    return SupervisionPlan(health=tuple(health), replace=tuple(replace), start=tuple(start))
