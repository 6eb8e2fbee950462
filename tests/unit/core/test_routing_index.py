"""The memoized routing orders give exactly the decisions of a plain scan, also after bookings."""

from __future__ import annotations

import random

from orchestrator.core.routing import RouteDecision, RoutingConfig, apply_route, route
from orchestrator.core.types import ClusterSnapshot, InstanceHealth, InstanceLoad, RequestInfo, Role


def _reference_decode(snapshot: ClusterSnapshot, request: RequestInfo, weight: float) -> str | None:
    best, best_key = None, None
    for pos, inst in enumerate(snapshot.instances):
        if inst.role is not Role.DECODE or not inst.is_routable:
            continue
        fits = inst.free_kv_blocks >= inst.blocks_for(request.prompt_tokens + 1)
        kv_used = 1.0 - inst.free_kv_blocks / inst.total_kv_blocks if inst.total_kv_blocks else 1.0
        batch = (inst.running_requests + inst.waiting_requests) / max(1, inst.max_running_requests)
        key = (not fits, kv_used + weight * batch, pos)
        if best_key is None or key < best_key:
            best, best_key = inst.instance_id, key
    return best


def _reference_prefill(snapshot: ClusterSnapshot) -> str | None:
    routable = [
        (i.queued_prefill_tokens, i.waiting_requests, pos, i.instance_id)
        for pos, i in enumerate(snapshot.instances)
        if i.role is Role.PREFILL and i.is_routable
    ]
    return min(routable)[3] if routable else None


def _random_snapshot(rng: random.Random, n: int) -> ClusterSnapshot:
    insts = []
    for i in range(n):
        role = rng.choice([Role.PREFILL, Role.DECODE])
        total = rng.choice([0, 8, 64])
        insts.append(
            InstanceLoad(
                instance_id=f"i{i}",
                role=role,
                health=rng.choice([InstanceHealth.HEALTHY] * 4 + [InstanceHealth.UNHEALTHY]),
                queued_prefill_tokens=rng.randrange(0, 400, 50),
                waiting_requests=rng.randrange(3),
                running_requests=rng.randrange(4),
                free_kv_blocks=rng.randint(0, total),
                total_kv_blocks=total,
                block_size=rng.choice([8, 16]),
                max_running_requests=8,
            )
        )
    return ClusterSnapshot(at_s=0.0, instances=tuple(insts), version=1)


def test_indexed_route_matches_a_plain_scan_through_a_burst_of_bookings() -> None:
    rng = random.Random(7)
    config = RoutingConfig(short_prompt_tokens=16, decode_batch_weight=0.5)
    for _ in range(20):
        snap = _random_snapshot(rng, rng.randint(1, 40))
        for r in range(30):
            req = RequestInfo(f"r{r}", prompt_tokens=rng.randint(1, 300), max_output_tokens=8, arrival_s=0.0)
            decision = route(snap, req, config)
            want_d = _reference_decode(snap, req, config.decode_batch_weight)
            if want_d is None:
                assert not isinstance(decision, RouteDecision)
                break
            assert isinstance(decision, RouteDecision)
            assert decision.decode_instance_id == want_d
            if req.prompt_tokens > config.short_prompt_tokens:
                assert decision.prefill_instance_id == _reference_prefill(snap)
            snap = apply_route(snap, req, decision)


def test_booked_snapshot_equals_one_built_from_scratch() -> None:
    rng = random.Random(3)
    snap = _random_snapshot(rng, 30)
    config = RoutingConfig()
    for r in range(10):
        req = RequestInfo(f"r{r}", prompt_tokens=100, max_output_tokens=8, arrival_s=0.0)
        decision = route(snap, req, config)
        assert isinstance(decision, RouteDecision)
        snap = apply_route(snap, req, decision)
        fresh = ClusterSnapshot(at_s=snap.at_s, instances=snap.instances, version=snap.version)
        assert route(fresh, req, config) == route(snap, req, config)
        assert fresh == snap
