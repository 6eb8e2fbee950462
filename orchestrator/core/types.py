"""Snapshot types shared by the controller, the routers and the simulator.

A ``ClusterSnapshot`` is an immutable picture of every instance's load at one
moment. Routers refresh it from the controller; the simulator builds it from
its instance models. Policies read it and return decisions; they never mutate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Role(str, Enum):
    """What an instance runs."""

    PREFILL = "prefill"
    DECODE = "decode"
    COLOCATED = "colocated"


class InstanceHealth(str, Enum):
    """Liveness as last seen by the controller."""

    HEALTHY = "healthy"
    DRAINING = "draining"
    UNHEALTHY = "unhealthy"


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What policies know about a request before it runs (no token ids)."""

    request_id: str
    prompt_tokens: int
    max_output_tokens: int
    arrival_s: float
    slo_class: str = "default"
    priority: int = 0


@dataclass(frozen=True, slots=True)
class InstanceLoad:
    """One instance's load report, as the controller last received it."""

    instance_id: str
    role: Role
    node_id: str = "node-0"
    health: InstanceHealth = InstanceHealth.HEALTHY
    queued_prefill_tokens: int = 0
    waiting_requests: int = 0
    running_requests: int = 0
    free_kv_blocks: int = 0
    total_kv_blocks: int = 0
    block_size: int = 16
    max_running_requests: int = 256
    recent_ttft_s: float | None = None
    recent_tpot_s: float | None = None
    reported_at_s: float = 0.0

    @property
    def is_routable(self) -> bool:
        """Whether new requests may be sent here."""
        return self.health is InstanceHealth.HEALTHY

    def blocks_for(self, tokens: int) -> int:
        """KV blocks needed to hold ``tokens`` tokens on this instance."""
        return -(-tokens // self.block_size)


@dataclass(frozen=True, slots=True)
class ClusterSnapshot:
    """All instances' loads at ``at_s``; ``version`` increases with every publish."""

    at_s: float
    instances: tuple[InstanceLoad, ...] = ()
    version: int = 0
    _by_role: dict[Role, tuple[InstanceLoad, ...]] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        by_role: dict[Role, list[InstanceLoad]] = {role: [] for role in Role}
        for inst in self.instances:
            by_role[inst.role].append(inst)
        self._by_role.update({role: tuple(insts) for role, insts in by_role.items()})

    def with_role(self, role: Role) -> tuple[InstanceLoad, ...]:
        """Instances of one role, in snapshot order."""
        return self._by_role[role]

    def get(self, instance_id: str) -> InstanceLoad | None:
        """The instance with this id, if present."""
        for inst in self.instances:
            if inst.instance_id == instance_id:
                return inst
        return None
