"""Placement layout: pairs, leftovers, bundles and worker ids."""

from __future__ import annotations

import pytest

from orchestrator.core.types import Role
from orchestrator.runtime.placement import (
    BundleShape,
    PlacementStrategy,
    Slot,
    instance_id_of,
    parse_instance_id,
    plan_groups,
)


def test_pairs_then_leftovers() -> None:
    groups = plan_groups(3, 1, PlacementStrategy.SPREAD)
    assert [g.name for g in groups] == ["pair-0", "prefill-1", "prefill-2"]
    assert groups[0].slots == (Slot(Role.PREFILL, 0), Slot(Role.DECODE, 0))
    assert all(g.strategy is PlacementStrategy.SPREAD for g in groups)
    assert [len(g.slots) for g in plan_groups(1, 2, PlacementStrategy.PACK)] == [2, 1]
    assert plan_groups(0, 1, PlacementStrategy.PACK)[0].slots == (Slot(Role.DECODE, 0),)
    with pytest.raises(ValueError, match="pool sizes"):
        plan_groups(-1, 1, PlacementStrategy.PACK)


def test_bundles_carry_pool_resource_and_gpus() -> None:
    assert BundleShape(1.0, 2.0).bundle(Role.DECODE) == {"CPU": 1.0, "decode_pool": 1.0, "GPU": 2.0}
    assert BundleShape(0.5, 0.0).bundle(Role.PREFILL) == {"CPU": 0.5, "prefill_pool": 1.0}
    assert PlacementStrategy.PACK.ray_strategy == "PACK"


def test_instance_ids_round_trip_and_foreign_ids_are_refused() -> None:
    slot = Slot(Role.DECODE, 3)
    assert parse_instance_id(instance_id_of(slot, 2)) == (slot, 2)
    for bad in ("decode-3", "colocated-x-g1", "foo-1-g2", "decode-1-2"):
        with pytest.raises(ValueError, match="not a pdserve worker id"):
            parse_instance_id(bad)
