"""The cluster's snapshot is updated in place of a rebuild: decisions must equal those over fresh snapshots."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import pytest
from sim_models import AffineModel

from orchestrator.core.admission import admit
from orchestrator.core.routing import RoutingConfig, carry_orders, route
from orchestrator.core.types import ClusterSnapshot, InstanceHealth, InstanceLoad, RequestInfo, Role
from simulations.sim.cluster import (
    ClusterSim,
    ControlDecision,
    SetHealth,
    colocated,
    disaggregated,
)
from simulations.sim.results import collect
from simulations.traces.trace import Trace

_PROBE_PROMPTS = (8, 200, 1500, 6000, 70_000)


def _trace(n: int, rate_rps: float, seed: int) -> Trace:
    rng = np.random.default_rng(seed)
    return Trace("t", np.cumsum(rng.exponential(1 / rate_rps, n)), rng.integers(1, 3000, n), rng.integers(1, 400, n))


class _RebuildEverySnapshot(ClusterSim):
    """The reference: a fresh snapshot (fresh sort orders) whenever any load changed."""

    def snapshot(self, now_s: float) -> ClusterSnapshot:
        loads = tuple([inst.load() for inst in self.instances])
        snap = self._snapshot
        if snap is None or any(a is not b for a, b in zip(loads, snap.instances, strict=True)):
            self._snapshot_version += 1
            snap = ClusterSnapshot(at_s=now_s, instances=loads, version=self._snapshot_version)
            self._snapshot = snap
        return snap


class _CheckEverySnapshot(ClusterSim):
    """Checks each incrementally updated snapshot against one rebuilt from the true loads."""

    checks = 0

    def snapshot(self, now_s: float) -> ClusterSnapshot:
        snap = super().snapshot(now_s)
        loads = tuple([inst.load() for inst in self.instances])
        assert all(a is b for a, b in zip(loads, snap.instances, strict=True))
        fresh = ClusterSnapshot(at_s=now_s, instances=loads, version=snap.version)
        routing = self.config.routing
        for prompt in _PROBE_PROMPTS:
            probe = RequestInfo("probe", prompt, 100, now_s)
            assert route(snap, probe, routing) == route(fresh, probe, routing)
            assert admit(snap, probe, self.config.admission, 3) == admit(fresh, probe, self.config.admission, 3)
        type(self).checks += 1
        return snap


class _DrainAndRestore:
    """Drains one instance for a while, then restores it (health changes move it out of the orders)."""

    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id
        self.ticks = 0

    def decide(self, snapshot: ClusterSnapshot, now_s: float) -> Sequence[ControlDecision]:
        self.ticks += 1
        if self.ticks % 7 == 3:
            return [SetHealth(self.instance_id, InstanceHealth.DRAINING)]
        if self.ticks % 7 == 6:
            return [SetHealth(self.instance_id, InstanceHealth.HEALTHY)]
        return []


def _outputs(sim: ClusterSim) -> tuple[bytes, ...]:
    sim.run()
    result = collect(sim)
    per_instance = repr([(i.busy_s, i.prefill_tokens_done, i.decode_tokens_done, i.preemptions)
                         for i in sim.instances]).encode()
    return (result.to_json().encode(), result.ttft_s.tobytes(), result.e2e_s.tobytes(), per_instance,
            str(sim.loop.events_run).encode())


CONFIGS = {
    "disagg-preempting": disaggregated(2, 3, decode_kv_blocks=900, kv_bytes_per_token=8e5),
    "disagg-control": disaggregated(3, 2, decode_kv_blocks=1500, control_interval_s=0.7),
    "colocated": colocated(3, kv_blocks=700),
}


@pytest.mark.parametrize("router_refresh_s", [0.0, 0.2])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_incremental_snapshot_gives_the_results_of_rebuilding_it(name: str, router_refresh_s: float) -> None:
    # 0: the router reads a snapshot on every arrival; 0.2: only on refreshes of its view.
    config = dataclasses.replace(CONFIGS[name], router_refresh_s=router_refresh_s)
    trace = _trace(700, 12.0, seed=4)
    control = (lambda: _DrainAndRestore("d1")) if config.control_interval_s else (lambda: None)
    reference = _outputs(_RebuildEverySnapshot(trace, AffineModel(), config, control()))
    _CheckEverySnapshot.checks = 0
    incremental = _outputs(_CheckEverySnapshot(trace, AffineModel(), config, control()))
    assert _CheckEverySnapshot.checks > (500 if router_refresh_s == 0 else 150)
    assert incremental == reference


def _random_load(rng: np.random.Generator, instance_id: str, role: Role) -> InstanceLoad:
    return InstanceLoad(
        instance_id=instance_id, role=role,
        health=InstanceHealth.HEALTHY if rng.random() < 0.8 else InstanceHealth.DRAINING,
        queued_prefill_tokens=int(rng.integers(0, 4)) * 1000, waiting_requests=int(rng.integers(0, 3)),
        running_requests=int(rng.integers(0, 4)), free_kv_blocks=int(rng.integers(0, 5)) * 100,
        total_kv_blocks=400, max_running_requests=4,
    )


def test_carried_orders_equal_a_fresh_sort_under_random_replacements() -> None:
    # Coarse random loads make ties on every key component but the position common.
    rng = np.random.default_rng(7)
    roles = [Role.PREFILL] * 5 + [Role.DECODE] * 5 + [Role.COLOCATED] * 3
    ids = [f"i{k}" for k in range(len(roles))]
    snap = ClusterSnapshot(0.0, tuple(_random_load(rng, i, r) for i, r in zip(ids, roles, strict=True)))
    config = RoutingConfig()
    for step in range(400):
        positions = sorted(set(rng.integers(0, len(ids), int(rng.integers(1, 6))).tolist()))
        moves = [(snap.instances[p], _random_load(rng, ids[p], roles[p]), p) for p in positions]
        nxt = snap.with_replaced({p: new for _, new, p in moves}, at_s=float(step), version=step)
        carry_orders(snap, nxt, moves)
        fresh = ClusterSnapshot(float(step), nxt.instances)
        for prompt in (4, 300, 2000, 9000):
            probe = RequestInfo(str(step), prompt, 10, 0.0)
            assert route(nxt, probe, config) == route(fresh, probe, config)
        assert nxt.at_s == float(step) and nxt.version == step
        snap = nxt
    assert any(isinstance(k, tuple) and k[0] == "route_order" for k in snap.memo)


@pytest.mark.parametrize("fill_slots", [True, False])
def test_load_reports_equal_the_constructed_report(fill_slots: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from simulations.sim import types

    monkeypatch.setattr(types, "_FILL_SLOTS", fill_slots)
    template = InstanceLoad(instance_id="d3", role=Role.DECODE, node_id="node-1", total_kv_blocks=900,
                            block_size=32, max_running_requests=64)
    reports = types.LoadReports(template)
    rng = np.random.default_rng(4)
    for _ in range(50):
        health = [InstanceHealth.HEALTHY, InstanceHealth.DRAINING][int(rng.integers(2))]
        q, w, r, f = (int(v) for v in rng.integers(0, 1000, 4))
        built = reports.build(health, q, w, r, f)
        expected = dataclasses.replace(template, health=health, queued_prefill_tokens=q, waiting_requests=w,
                                       running_requests=r, free_kv_blocks=f)
        assert built == expected and hash(built) == hash(expected)
        assert built.is_routable is (health is InstanceHealth.HEALTHY)
        with pytest.raises(dataclasses.FrozenInstanceError):
            built.free_kv_blocks = 0  # type: ignore[misc]


@pytest.mark.parametrize("fill_slots", [True, False])
def test_request_infos_equal_the_constructed_ones(fill_slots: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from simulations.sim import types

    builder = types._RequestInfos()
    assert builder._fill  # RequestInfo is a plain slotted dataclass: the fast path applies
    monkeypatch.setattr(builder, "_fill", fill_slots)
    for idx, prompt, output, arrival_s in ((0, 1, 1, 0.0), (17, 4096, 300, 12.5), (999_999, 70_000, 1, 3e5)):
        built = builder.build(idx, prompt, output, arrival_s)
        expected = RequestInfo(str(idx), prompt, output, arrival_s)
        assert built == expected and hash(built) == hash(expected) and repr(built) == repr(expected)
        assert (built.slo_class, built.priority) == ("default", 0)


def test_a_request_keeps_one_request_info_across_retries() -> None:
    from simulations.sim.types import SimRequest

    req = SimRequest(5, 100, 20, 1.5)
    first = req.request_info()
    assert first is req.request_info()
    assert first == RequestInfo("5", 100, 20, 1.5)
