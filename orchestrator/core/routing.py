"""Routing: choose the prefill instance P and the decode instance D of a request.

Order of preference:
1. prompts at or under ``short_prompt_tokens`` run their prefill on D itself
   (moving a tiny KV costs more than computing it);
2. otherwise P = the prefill instance with the least queued prefill work and
   D = the decode instance with the most headroom that can hold the request;
3. with no prefill instance left, D prefills locally (degraded, still served);
4. with no decode instance, a colocated instance serves both phases.

Ties break on snapshot order, so a decision is a pure function of its inputs.
``apply_route`` books a decision into a snapshot so a router can route a burst
of requests between two snapshot refreshes without piling them on one instance.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

from orchestrator.core.types import ClusterSnapshot, InstanceLoad, RequestInfo, Role


class RouteMode(str, Enum):
    """How a routed request runs."""

    DISAGGREGATED = "disaggregated"  # prefill on P, KV moves to D
    DECODE_LOCAL_PREFILL = "decode_local_prefill"  # D runs both phases
    COLOCATED = "colocated"  # a colocated instance runs both phases


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    """Knobs of the routing policy."""

    short_prompt_tokens: int = 32
    # Weight of decode batch occupancy against KV occupancy when scoring D.
    decode_batch_weight: float = 1.0


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """Where a request runs; ``prefill_instance_id`` is None unless DISAGGREGATED."""

    mode: RouteMode
    decode_instance_id: str
    prefill_instance_id: str | None = None


@dataclass(frozen=True, slots=True)
class NoRoute:
    """No instance can take the request; ``reason`` is for the error message."""

    reason: str


def _prefill_score(inst: InstanceLoad) -> tuple[int, int]:
    return (inst.queued_prefill_tokens, inst.waiting_requests)


def _decode_score(inst: InstanceLoad, config: RoutingConfig) -> float:
    kv_used = 1.0 - inst.free_kv_blocks / inst.total_kv_blocks if inst.total_kv_blocks else 1.0
    batch_used = (inst.running_requests + inst.waiting_requests) / max(1, inst.max_running_requests)
    return kv_used + config.decode_batch_weight * batch_used


def _pick_decode(
    snapshot: ClusterSnapshot, role: Role, request: RequestInfo, config: RoutingConfig
) -> InstanceLoad | None:
    best: InstanceLoad | None = None
    best_fit = False
    best_score = 0.0
    for inst in snapshot.with_role(role):
        if not inst.is_routable:
            continue
        fits = inst.free_kv_blocks >= inst.blocks_for(request.prompt_tokens + 1)
        score = _decode_score(inst, config)
        # An instance that can hold the prompt now always beats one that cannot.
        if best is None or (fits and not best_fit) or (fits == best_fit and score < best_score):
            best, best_fit, best_score = inst, fits, score
    return best


def route(
    snapshot: ClusterSnapshot, request: RequestInfo, config: RoutingConfig
) -> RouteDecision | NoRoute:
    """Pick instances for ``request`` from ``snapshot``; never mutates either."""
    decode = _pick_decode(snapshot, Role.DECODE, request, config)
    if decode is None:
        colocated = _pick_decode(snapshot, Role.COLOCATED, request, config)
        if colocated is None:
            return NoRoute("no healthy decode or colocated instance")
        return RouteDecision(RouteMode.COLOCATED, colocated.instance_id)
    if request.prompt_tokens <= config.short_prompt_tokens:
        return RouteDecision(RouteMode.DECODE_LOCAL_PREFILL, decode.instance_id)
    prefill = min(
        (inst for inst in snapshot.with_role(Role.PREFILL) if inst.is_routable),
        key=_prefill_score,
        default=None,
    )
    if prefill is None:
        return RouteDecision(RouteMode.DECODE_LOCAL_PREFILL, decode.instance_id)
    return RouteDecision(RouteMode.DISAGGREGATED, decode.instance_id, prefill.instance_id)


def apply_route(snapshot: ClusterSnapshot, request: RequestInfo, decision: RouteDecision) -> ClusterSnapshot:
    """Return ``snapshot`` with ``decision``'s expected load booked on its instances."""
    changed: dict[str, InstanceLoad] = {}
    decode = snapshot.get(decision.decode_instance_id)
    if decode is not None:
        blocks = decode.blocks_for(request.prompt_tokens + 1)
        local_prefill = decision.prefill_instance_id is None
        changed[decode.instance_id] = replace(
            decode,
            free_kv_blocks=max(0, decode.free_kv_blocks - blocks),
            waiting_requests=decode.waiting_requests + 1,
            queued_prefill_tokens=decode.queued_prefill_tokens + (request.prompt_tokens if local_prefill else 0),
        )
    if decision.prefill_instance_id is not None:
        prefill = snapshot.get(decision.prefill_instance_id)
        if prefill is not None:
            changed[prefill.instance_id] = replace(
                prefill,
                queued_prefill_tokens=prefill.queued_prefill_tokens + request.prompt_tokens,
                waiting_requests=prefill.waiting_requests + 1,
            )
    instances = tuple(changed.get(inst.instance_id, inst) for inst in snapshot.instances)
    return ClusterSnapshot(at_s=snapshot.at_s, instances=instances, version=snapshot.version)
