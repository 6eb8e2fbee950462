"""Snapshot types shared by the controller, the routers and the simulator.

A ``ClusterSnapshot`` is an immutable picture of every instance's load at one
moment. Routers refresh it from the controller; the simulator builds it from
its instance models. Policies read it and return decisions; they never mutate.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from enum import Enum

from orchestrator.core._plain import plain


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


@plain
@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What policies know about a request before it runs (no token ids)."""

    request_id: str
    prompt_tokens: int
    max_output_tokens: int
    arrival_s: float
    slo_class: str = "default"
    priority: int = 0


@plain
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


_BOOKED_FIELDS = ("queued_prefill_tokens", "waiting_requests", "free_kv_blocks")
_KEPT_FIELDS = tuple(f.name for f in fields(InstanceLoad) if f.name not in _BOOKED_FIELDS)
# Filling a new report's slots skips the dataclass __init__ and ``replace``'s field lookups (a router
# books a copy per request); valid while every field is a slot and nothing runs after __init__.
_FILL_LOAD = not hasattr(InstanceLoad, "__post_init__") and set(InstanceLoad.__slots__) == {
    f.name for f in fields(InstanceLoad)}


def booked_load(inst: InstanceLoad, queued_prefill_tokens: int, waiting_requests: int,
                free_kv_blocks: int) -> InstanceLoad:
    """``replace(inst, ...)`` with these three fields: the report as a router books a request into it."""
    if not _FILL_LOAD:
        return replace(inst, queued_prefill_tokens=queued_prefill_tokens, waiting_requests=waiting_requests,
                       free_kv_blocks=free_kv_blocks)
    new: InstanceLoad = object.__new__(InstanceLoad)
    put = object.__setattr__
    for name in _KEPT_FIELDS:
        put(new, name, getattr(inst, name))
    put(new, "queued_prefill_tokens", queued_prefill_tokens)
    put(new, "waiting_requests", waiting_requests)
    put(new, "free_kv_blocks", free_kv_blocks)
    return new


# Memo keys starting with this hold structures that depend only on positions, ids, roles and
# health; ``with_replaced`` hands them on when it changes none of those.
STABLE_MEMO = "stable"


@plain
@dataclass(frozen=True, slots=True)
class ClusterSnapshot:
    """All instances' loads at ``at_s``; ``version`` increases with every publish."""

    at_s: float
    instances: tuple[InstanceLoad, ...] = ()
    version: int = 0
    _by_role: dict[Role, tuple[InstanceLoad, ...]] = field(default_factory=dict, compare=False, repr=False)
    # instance_id -> position in ``instances``.
    _by_id: dict[str, int] = field(default_factory=dict, compare=False, repr=False)
    # Structures policies derive from this snapshot (e.g. routing's sorted candidates), computed
    # once per snapshot; safe to cache because a snapshot never changes.
    memo: dict[object, object] = field(default_factory=dict, compare=False, repr=False)

    # The indexes are built on first use, not in __post_init__: a router books every request
    # into a derived snapshot (routing.apply_route) that may never need them.
    def _role_index(self) -> dict[Role, tuple[InstanceLoad, ...]]:
        if not self._by_role:
            by_role: dict[Role, list[InstanceLoad]] = {role: [] for role in Role}
            for inst in self.instances:
                by_role[inst.role].append(inst)
            self._by_role.update({role: tuple(insts) for role, insts in by_role.items()})
        return self._by_role

    def _id_index(self) -> dict[str, int]:
        if not self._by_id and self.instances:
            by_id = self._by_id
            for pos, inst in enumerate(self.instances):
                by_id.setdefault(inst.instance_id, pos)
        return self._by_id

    def with_role(self, role: Role) -> tuple[InstanceLoad, ...]:
        """Instances of one role, in snapshot order."""
        return self._role_index()[role]

    def get(self, instance_id: str) -> InstanceLoad | None:
        """The instance with this id, if present."""
        pos = self._id_index().get(instance_id)
        return None if pos is None else self.instances[pos]

    def position(self, instance_id: str) -> int | None:
        """Index of the instance with this id in ``instances``, if present."""
        return self._id_index().get(instance_id)

    def with_replaced(
        self, replacements: dict[int, InstanceLoad], at_s: float | None = None, version: int | None = None
    ) -> ClusterSnapshot:
        """This snapshot with the instances at the given positions replaced (ids must not change).

        ``at_s`` and ``version`` default to this snapshot's; a publisher passes new ones.
        """
        instances = list(self.instances)
        same_roles_and_health = True
        for pos, inst in replacements.items():
            old = instances[pos]
            if inst.instance_id != old.instance_id:
                raise ValueError(f"position {pos} holds {old.instance_id!r}, not {inst.instance_id!r}")
            same_roles_and_health &= inst.role is old.role and inst.health is old.health
            instances[pos] = inst
        # Positions are unchanged, so the id index is shared rather than rebuilt.
        derived = ClusterSnapshot(
            at_s=self.at_s if at_s is None else at_s,
            instances=tuple(instances),
            version=self.version if version is None else version,
            _by_id=self._id_index(),
        )
        if same_roles_and_health:
            for key, value in self.memo.items():
                if isinstance(key, tuple) and key and key[0] == STABLE_MEMO:
                    derived.memo[key] = value
        return derived
