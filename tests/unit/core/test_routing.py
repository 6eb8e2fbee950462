"""Routing policy: pure decisions over snapshots."""

from __future__ import annotations

from dataclasses import replace

from orchestrator.core.routing import (
    NoRoute,
    RouteDecision,
    RouteMode,
    RoutingConfig,
    apply_route,
    route,
    serving_gap,
)
from orchestrator.core.types import ClusterSnapshot, InstanceHealth, InstanceLoad, RequestInfo, Role

CONFIG = RoutingConfig(short_prompt_tokens=32)


def _req(prompt_tokens: int = 200, rid: str = "r") -> RequestInfo:
    return RequestInfo(request_id=rid, prompt_tokens=prompt_tokens, max_output_tokens=16, arrival_s=0.0)


def _inst(iid: str, role: Role, **kw: object) -> InstanceLoad:
    base = InstanceLoad(instance_id=iid, role=role, free_kv_blocks=100, total_kv_blocks=100, block_size=16)
    return replace(base, **kw)  # type: ignore[arg-type]


def test_disaggregated_picks_least_queued_prefill_and_emptiest_decode() -> None:
    snap = ClusterSnapshot(
        at_s=0.0,
        instances=(
            _inst("p0", Role.PREFILL, queued_prefill_tokens=500),
            _inst("p1", Role.PREFILL, queued_prefill_tokens=100),
            _inst("d0", Role.DECODE, free_kv_blocks=10, running_requests=5),
            _inst("d1", Role.DECODE, free_kv_blocks=90, running_requests=1),
        ),
    )
    decision = route(snap, _req(), CONFIG)
    assert decision == RouteDecision(RouteMode.DISAGGREGATED, decode_instance_id="d1", prefill_instance_id="p1")


def test_short_prompt_prefills_on_decode() -> None:
    snap = ClusterSnapshot(at_s=0.0, instances=(_inst("p0", Role.PREFILL), _inst("d0", Role.DECODE)))
    decision = route(snap, _req(prompt_tokens=32), CONFIG)
    assert decision == RouteDecision(RouteMode.DECODE_LOCAL_PREFILL, decode_instance_id="d0")
    assert isinstance(route(snap, _req(prompt_tokens=33), CONFIG), RouteDecision)
    assert route(snap, _req(prompt_tokens=33), CONFIG).prefill_instance_id == "p0"  # type: ignore[union-attr]


def test_unhealthy_instances_are_skipped_and_missing_prefill_degrades_to_local() -> None:
    snap = ClusterSnapshot(
        at_s=0.0,
        instances=(
            _inst("p0", Role.PREFILL, health=InstanceHealth.UNHEALTHY),
            _inst("d0", Role.DECODE, health=InstanceHealth.DRAINING),
            _inst("d1", Role.DECODE, free_kv_blocks=1),
        ),
    )
    decision = route(snap, _req(), CONFIG)
    assert decision == RouteDecision(RouteMode.DECODE_LOCAL_PREFILL, decode_instance_id="d1")


def test_decode_that_fits_beats_emptier_batch_that_does_not() -> None:
    snap = ClusterSnapshot(
        at_s=0.0,
        instances=(
            _inst("p0", Role.PREFILL),
            _inst("d0", Role.DECODE, free_kv_blocks=2, running_requests=0),
            _inst("d1", Role.DECODE, free_kv_blocks=50, running_requests=30),
        ),
    )
    decision = route(snap, _req(prompt_tokens=200), CONFIG)  # needs 13 blocks
    assert isinstance(decision, RouteDecision) and decision.decode_instance_id == "d1"


def test_colocated_fallback_and_no_route() -> None:
    colo = ClusterSnapshot(at_s=0.0, instances=(_inst("c0", Role.COLOCATED),))
    assert route(colo, _req(), CONFIG) == RouteDecision(RouteMode.COLOCATED, decode_instance_id="c0")
    only_prefill = ClusterSnapshot(at_s=0.0, instances=(_inst("p0", Role.PREFILL),))
    assert isinstance(route(only_prefill, _req(), CONFIG), NoRoute)


def test_apply_route_books_load_so_a_burst_spreads() -> None:
    snap = ClusterSnapshot(
        at_s=0.0,
        instances=(
            _inst("p0", Role.PREFILL),
            _inst("p1", Role.PREFILL),
            _inst("d0", Role.DECODE),
            _inst("d1", Role.DECODE),
        ),
    )
    chosen_p, chosen_d = [], []
    for i in range(4):
        req = _req(rid=f"r{i}")
        decision = route(snap, req, CONFIG)
        assert isinstance(decision, RouteDecision)
        chosen_p.append(decision.prefill_instance_id)
        chosen_d.append(decision.decode_instance_id)
        snap = apply_route(snap, req, decision)
    assert sorted(chosen_p) == ["p0", "p0", "p1", "p1"]
    assert sorted(chosen_d) == ["d0", "d0", "d1", "d1"]
    d0 = snap.get("d0")
    assert d0 is not None and d0.free_kv_blocks == 100 - 2 * 13


def test_route_is_deterministic_and_does_not_mutate() -> None:
    snap = ClusterSnapshot(at_s=1.0, instances=(_inst("p0", Role.PREFILL), _inst("d0", Role.DECODE)), version=3)
    before = repr(snap)
    assert route(snap, _req(), CONFIG) == route(snap, _req(), CONFIG)
    assert repr(snap) == before


def test_serving_gap_says_why_no_request_could_be_served() -> None:
    def inst(name: str, role: Role, health: InstanceHealth = InstanceHealth.HEALTHY) -> InstanceLoad:
        return InstanceLoad(name, role, health=health, free_kv_blocks=8, total_kv_blocks=8)

    assert serving_gap(ClusterSnapshot(0.0, (inst("p0", Role.PREFILL), inst("d0", Role.DECODE)))) is None
    assert serving_gap(ClusterSnapshot(0.0, (inst("c0", Role.COLOCATED),))) is None
    no_decode = "no healthy decode or colocated instance"
    assert serving_gap(ClusterSnapshot(0.0, (inst("p0", Role.PREFILL),))) == no_decode
    dead = ClusterSnapshot(0.0, (inst("p0", Role.PREFILL), inst("d0", Role.DECODE, InstanceHealth.UNHEALTHY)))
    assert serving_gap(dead) == no_decode
    assert serving_gap(ClusterSnapshot(0.0)) == no_decode
