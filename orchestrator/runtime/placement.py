"""Where workers go: pairing prefill and decode slots into placement groups.

Slots are ``(role, index)``. The i-th prefill and the i-th decode slot form a
pair that shares one placement group of two bundles, PACKed onto one node
(the KV transfer stays on the node: shm, NVLink) or SPREAD over two (fault
isolation, more aggregate bandwidth). Slots without a partner get a group of
their own. A replacement worker reuses its slot's bundle, so it lands where
its predecessor was. Pure layout here; ``builder`` creates the groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from orchestrator.core.types import Role

POOL_RESOURCE = {Role.PREFILL: "prefill_pool", Role.DECODE: "decode_pool"}


class PlacementStrategy(str, Enum):
    """How the two workers of a prefill/decode pair are placed."""

    PACK = "pack"  # same node when possible
    SPREAD = "spread"  # different nodes when possible

    @property
    def ray_strategy(self) -> str:
        """Ray's placement-group strategy name."""
        return "PACK" if self is PlacementStrategy.PACK else "SPREAD"


@dataclass(frozen=True, slots=True)
class Slot:
    """A worker position: its role and index within the pool."""

    role: Role
    index: int

    @property
    def name(self) -> str:
        """Stable name, e.g. ``decode-0``."""
        return f"{self.role.value}-{self.index}"


@dataclass(frozen=True, slots=True)
class BundleShape:
    """Resources one worker asks for."""

    num_cpus: float
    num_gpus: float  # = tensor-parallel degree on GPU clusters; logical GPUs on a laptop

    def bundle(self, role: Role) -> dict[str, float]:
        """The Ray bundle of a worker of ``role``."""
        shape = {"CPU": self.num_cpus, POOL_RESOURCE[role]: 1.0}
        if self.num_gpus > 0:
            shape["GPU"] = self.num_gpus
        return shape


@dataclass(frozen=True, slots=True)
class GroupPlan:
    """One placement group: its name suffix, strategy, and the slot of each bundle."""

    name: str
    strategy: PlacementStrategy
    slots: tuple[Slot, ...]


def plan_groups(num_prefill: int, num_decode: int, strategy: PlacementStrategy) -> tuple[GroupPlan, ...]:
    """Pair prefill i with decode i; leftover slots get single-bundle groups."""
    if num_prefill < 0 or num_decode < 0:
        raise ValueError(f"pool sizes must be >= 0, got prefill={num_prefill} decode={num_decode}")
    groups: list[GroupPlan] = []
    for i in range(max(num_prefill, num_decode)):
        slots = tuple(
            Slot(role, i) for role, n in ((Role.PREFILL, num_prefill), (Role.DECODE, num_decode)) if i < n
        )
        name = f"pair-{i}" if len(slots) == 2 else f"{slots[0].name}"
        groups.append(GroupPlan(name, strategy, slots))
    return tuple(groups)


def instance_id_of(slot: Slot, generation: int) -> str:
    """Worker id of the ``generation``-th worker started in ``slot``, e.g. ``decode-0-g1``."""
    return f"{slot.name}-g{generation}"


def parse_instance_id(instance_id: str) -> tuple[Slot, int]:
    """Inverse of ``instance_id_of``; raises ValueError for foreign ids."""
    try:
        role_name, index, gen = instance_id.rsplit("-", 2)
        if not gen.startswith("g"):
            raise ValueError
        return Slot(Role(role_name), int(index)), int(gen[1:])
    except ValueError:
        raise ValueError(f"not a pdserve worker id: {instance_id!r}") from None
