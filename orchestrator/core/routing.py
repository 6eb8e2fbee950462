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

from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

from orchestrator.core._plain import plain
from orchestrator.core.types import ClusterSnapshot, InstanceLoad, RequestInfo, Role, booked_load


class RouteMode(str, Enum):
    """How a routed request runs."""

    DISAGGREGATED = "disaggregated"  # prefill on P, KV moves to D
    DECODE_LOCAL_PREFILL = "decode_local_prefill"  # D runs both phases
    COLOCATED = "colocated"  # a colocated instance runs both phases


@plain
@dataclass(frozen=True, slots=True)
class RoutingConfig:
    """Knobs of the routing policy."""

    short_prompt_tokens: int = 32
    # Weight of decode batch occupancy against KV occupancy when scoring D.
    decode_batch_weight: float = 1.0


@plain
@dataclass(frozen=True, slots=True)
class RouteDecision:
    """Where a request runs; ``prefill_instance_id`` is None unless DISAGGREGATED."""

    mode: RouteMode
    decode_instance_id: str
    prefill_instance_id: str | None = None


@plain
@dataclass(frozen=True, slots=True)
class NoRoute:
    """No instance can take the request; ``reason`` is for the error message."""

    reason: str


def _decode_score(inst: InstanceLoad, decode_batch_weight: float) -> float:
    kv_used = 1.0 - inst.free_kv_blocks / inst.total_kv_blocks if inst.total_kv_blocks else 1.0
    batch_used = (inst.running_requests + inst.waiting_requests) / max(1, inst.max_running_requests)
    return kv_used + decode_batch_weight * batch_used


class _Order:
    """Routable instances of one role sorted by ``key_of``; memoized on a snapshot, never mutated.

    A plain slotted class rather than a frozen dataclass: one is built per snapshot refresh,
    and a frozen dataclass costs several times as much to construct.
    """

    __slots__ = ("role", "key_of", "keys", "instances")

    def __init__(
        self,
        role: Role,
        key_of: Callable[[InstanceLoad, int], tuple[float, ...]],  # (instance, position) -> sort key
        keys: tuple[tuple[float, ...], ...],
        instances: tuple[InstanceLoad, ...],
    ) -> None:
        self.role = role
        self.key_of = key_of
        self.keys = keys
        self.instances = instances

    def rebooked(self, old: InstanceLoad, new: InstanceLoad, pos: int) -> _Order:
        """This order with ``old`` (at snapshot position ``pos``) replaced by ``new``."""
        keys, insts = self.keys, self.instances
        if old.is_routable:
            i = bisect_left(keys, self.key_of(old, pos))
            if i < len(insts) and insts[i] is old:
                keys, insts = keys[:i] + keys[i + 1 :], insts[:i] + insts[i + 1 :]
        if new.is_routable:
            key = self.key_of(new, pos)
            i = bisect_left(keys, key)
            keys, insts = keys[:i] + (key,) + keys[i:], insts[:i] + (new,) + insts[i:]
        return _Order(self.role, self.key_of, keys, insts)

    def rebooked_all(self, moves: Sequence[tuple[InstanceLoad, InstanceLoad, int]]) -> _Order:
        """This order with every ``(old, new, pos)`` of ``moves`` (distinct positions) applied at once."""
        gone = {pos for _, _, pos in moves}
        key_of = self.key_of
        # Keys end in the position, so ``key[-1]`` names the entry and sorting never ties.
        entries = [(key, inst) for key, inst in zip(self.keys, self.instances, strict=True) if key[-1] not in gone]
        entries.extend((key_of(new, pos), new) for _, new, pos in moves if new.is_routable)
        entries.sort()
        return _Order(self.role, key_of, tuple([e[0] for e in entries]), tuple([e[1] for e in entries]))


def _order(
    snapshot: ClusterSnapshot, role: Role, name: object, key_of: Callable[[InstanceLoad, int], tuple[float, ...]]
) -> _Order:
    """Build (once per snapshot) the sorted routable instances of ``role``."""
    memo_key = ("route_order", role, name)
    order = snapshot.memo.get(memo_key)
    if order is None:
        entries = sorted(
            (key_of(inst, pos), inst)
            for pos, inst in enumerate(snapshot.instances)
            if inst.role is role and inst.is_routable
        )
        order = _Order(role, key_of, tuple(e[0] for e in entries), tuple(e[1] for e in entries))
        snapshot.memo[memo_key] = order
    return order  # type: ignore[return-value]


def _decode_order(snapshot: ClusterSnapshot, role: Role, config: RoutingConfig) -> tuple[InstanceLoad, ...]:
    """Routable instances of ``role`` by (score, snapshot order)."""
    weight = config.decode_batch_weight

    def key_of(inst: InstanceLoad, pos: int) -> tuple[float, ...]:
        return (_decode_score(inst, weight), pos)

    return _order(snapshot, role, ("decode", weight), key_of).instances


def _prefill_key(inst: InstanceLoad, pos: int) -> tuple[float, ...]:
    return (inst.queued_prefill_tokens, inst.waiting_requests, pos)


def _best_prefill(snapshot: ClusterSnapshot) -> InstanceLoad | None:
    """The routable prefill instance with the least queued work (first on ties)."""
    order = _order(snapshot, Role.PREFILL, "prefill", _prefill_key).instances
    return order[0] if order else None


def _pick_decode(
    snapshot: ClusterSnapshot, role: Role, request: RequestInfo, config: RoutingConfig
) -> InstanceLoad | None:
    order = _decode_order(snapshot, role, config)
    # An instance that can hold the prompt now always beats one that cannot; among those that
    # fit (or, when none fits, among all) the lowest score wins, ties on snapshot order.
    tokens = request.prompt_tokens + 1
    for inst in order:
        if inst.free_kv_blocks >= inst.blocks_for(tokens):
            return inst
    return order[0] if order else None


def serving_gap(snapshot: ClusterSnapshot) -> str | None:
    """Why ``snapshot`` can serve no request at all (None: some decode or colocated instance is routable)."""
    if any(inst.is_routable and inst.role in (Role.DECODE, Role.COLOCATED) for inst in snapshot.instances):
        return None
    return "no healthy decode or colocated instance"


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
    prefill = _best_prefill(snapshot)
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
        changed[decode.instance_id] = booked_load(
            decode,
            queued_prefill_tokens=decode.queued_prefill_tokens + (request.prompt_tokens if local_prefill else 0),
            waiting_requests=decode.waiting_requests + 1,
            free_kv_blocks=max(0, decode.free_kv_blocks - blocks),
        )
    if decision.prefill_instance_id is not None:
        prefill = snapshot.get(decision.prefill_instance_id)
        if prefill is not None:
            changed[prefill.instance_id] = booked_load(
                prefill,
                queued_prefill_tokens=prefill.queued_prefill_tokens + request.prompt_tokens,
                waiting_requests=prefill.waiting_requests + 1,
                free_kv_blocks=prefill.free_kv_blocks,
            )
    moves: list[tuple[InstanceLoad, InstanceLoad, int]] = []
    for instance_id, new in changed.items():
        pos = snapshot.position(instance_id)
        assert pos is not None  # changed only holds instances found in the snapshot
        moves.append((snapshot.instances[pos], new, pos))
    booked = snapshot.with_replaced({pos: new for _, new, pos in moves})
    carry_orders(snapshot, booked, moves)
    return booked


def carry_orders(
    source: ClusterSnapshot, target: ClusterSnapshot, moves: Sequence[tuple[InstanceLoad, InstanceLoad, int]]
) -> None:
    """Hand ``source``'s memoized routing orders to ``target``, which differs by ``moves`` (old, new, position).

    Re-sorting is skipped: a burst routes in O(log n) per request, and a publisher that
    replaces a few loads keeps the orders; sort keys end in the position, so the carried
    order is exactly the one a fresh sort of ``target`` would give.
    """
    distinct = len({pos for _, _, pos in moves}) == len(moves)
    for memo_key, order in source.memo.items():
        if isinstance(order, _Order):
            mine = [move for move in moves if move[0].role is order.role]
            if len(mine) > 1 and distinct:
                order = order.rebooked_all(mine)
            else:
                for old, new, pos in mine:
                    order = order.rebooked(old, new, pos)
            target.memo[memo_key] = order
