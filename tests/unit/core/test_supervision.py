"""Supervision policy: health marks, replacements and pool growth from observations."""

from __future__ import annotations

import pytest

from orchestrator.core.supervision import SupervisionConfig, WorkerStatus, supervise
from orchestrator.core.types import InstanceHealth, Role

CONFIG = SupervisionConfig(unhealthy_after_failures=2, replace_after_failures=4, max_actions_per_round=3)
TARGETS = {Role.PREFILL: 1, Role.DECODE: 2}


def test_dead_worker_is_replaced_at_once_and_marked_unhealthy() -> None:
    workers = [
        WorkerStatus("p0", Role.PREFILL, alive=True),
        WorkerStatus("d0", Role.DECODE, alive=False),
        WorkerStatus("d1", Role.DECODE, alive=True),
    ]
    plan = supervise(workers, TARGETS, CONFIG)
    assert plan.replace == ("d0",)
    assert dict(plan.health) == {
        "p0": InstanceHealth.HEALTHY,
        "d0": InstanceHealth.UNHEALTHY,
        "d1": InstanceHealth.HEALTHY,
    }
    assert plan.start == ()  # the replaced worker keeps its slot


def test_failing_probes_first_unroute_then_replace() -> None:
    one = supervise([WorkerStatus("d0", Role.DECODE, True, consecutive_failures=1)], {Role.DECODE: 1}, CONFIG)
    two = supervise([WorkerStatus("d0", Role.DECODE, True, consecutive_failures=2)], {Role.DECODE: 1}, CONFIG)
    four = supervise([WorkerStatus("d0", Role.DECODE, True, consecutive_failures=4)], {Role.DECODE: 1}, CONFIG)
    assert dict(one.health)["d0"] is InstanceHealth.HEALTHY and one.replace == ()
    assert dict(two.health)["d0"] is InstanceHealth.UNHEALTHY and two.replace == ()
    assert four.replace == ("d0",)


def test_missing_workers_are_started_within_the_round_budget() -> None:
    plan = supervise([WorkerStatus("x", Role.PREFILL, alive=False)], {Role.PREFILL: 2, Role.DECODE: 3}, CONFIG)
    assert plan.replace == ("x",)
    # budget 3: one replacement, then decode before prefill (sorted by role name), two starts
    assert plan.start == (Role.DECODE, Role.DECODE)


def test_invalid_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="replace_after_failures"):
        SupervisionConfig(unhealthy_after_failures=3, replace_after_failures=2)
