"""Admission: admit, queue or reject a request, with a reason, from queue limits.

Admission runs before routing. It rejects what can never run (prompt beyond
the context window, no instance to serve it) and applies back-pressure when
every candidate's prefill queue is over its limit: the request's SLO class
decides between queueing at the router and an explicit rejection (HTTP 429
with Retry-After at the edge). Nothing is dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from orchestrator.core._plain import plain
from orchestrator.core.slo import OverloadAction
from orchestrator.core.types import STABLE_MEMO, ClusterSnapshot, InstanceLoad, RequestInfo, Role


class AdmissionOutcome(str, Enum):
    """The three possible answers of admission."""

    ADMIT = "admit"
    QUEUE = "queue"
    REJECT = "reject"


class RejectReason(str, Enum):
    """Why a request was (or would be) turned away."""

    PROMPT_TOO_LONG = "prompt_too_long"
    NO_INSTANCES = "no_instances"
    OVERLOADED = "overloaded"
    QUEUE_FULL = "queue_full"


@plain
@dataclass(frozen=True, slots=True)
class AdmissionConfig:
    """Limits admission enforces; defaults suit the embedded tiny model."""

    max_context_tokens: int = 2048
    max_queued_prefill_tokens: int = 65536
    max_waiting_requests: int = 256
    max_router_queue: int = 1024
    on_overload: OverloadAction = OverloadAction.QUEUE
    # Assumed prefill throughput used only to estimate Retry-After.
    prefill_tokens_per_s: float = 8192.0


@plain
@dataclass(frozen=True, slots=True)
class AdmissionDecision:
    """Admission's answer; ``reason`` is set exactly when it is not ADMIT."""

    outcome: AdmissionOutcome
    reason: RejectReason | None = None
    retry_after_s: float | None = None


# Decisions are immutable, so the common answer is shared rather than built per request.
_ADMIT = AdmissionDecision(AdmissionOutcome.ADMIT)


def _entry_positions(snapshot: ClusterSnapshot) -> tuple[int, ...]:
    """Positions of the instances that can take a new prompt: prefill first, else colocated or decode."""
    key = (STABLE_MEMO, "admission_entry")
    positions = snapshot.memo.get(key)
    if positions is None:
        positions = ()
        for role in (Role.PREFILL, Role.COLOCATED, Role.DECODE):
            positions = tuple(
                pos for pos, i in enumerate(snapshot.instances) if i.role is role and i.is_routable
            )
            if positions:
                break
        # Only roles and health decide these, so a snapshot booked by routing reuses them.
        snapshot.memo[key] = positions
    return positions  # type: ignore[return-value]


def _entry_instances(snapshot: ClusterSnapshot) -> tuple[InstanceLoad, ...]:
    """Instances that can take a new prompt: prefill first, else decode or colocated."""
    return tuple(snapshot.instances[pos] for pos in _entry_positions(snapshot))


def _has_room(inst: InstanceLoad, request: RequestInfo, config: AdmissionConfig) -> bool:
    return (
        inst.queued_prefill_tokens + request.prompt_tokens <= config.max_queued_prefill_tokens
        and inst.waiting_requests < config.max_waiting_requests
    )


def context_window(max_positions: int, snapshot: ClusterSnapshot) -> int:
    """The most tokens (prompt plus output) one request may hold on every instance of ``snapshot``.

    The model's positions, capped by the smallest KV cache that reported one: an engine never lets
    a sequence outgrow its cache, so a window advertised beyond it would cut requests short.
    """
    capacities = [inst.total_kv_blocks * inst.block_size for inst in snapshot.instances if inst.total_kv_blocks > 0]
    return min([max_positions, *capacities])


def admit(
    snapshot: ClusterSnapshot,
    request: RequestInfo,
    config: AdmissionConfig,
    router_queue_depth: int = 0,
    on_overload: OverloadAction | None = None,
) -> AdmissionDecision:
    """Decide whether ``request`` enters now, waits at the router, or is rejected."""
    if request.prompt_tokens + request.max_output_tokens > config.max_context_tokens:
        return AdmissionDecision(AdmissionOutcome.REJECT, RejectReason.PROMPT_TOO_LONG)
    positions = _entry_positions(snapshot)
    if not positions:
        return AdmissionDecision(AdmissionOutcome.REJECT, RejectReason.NO_INSTANCES, retry_after_s=1.0)
    instances = snapshot.instances
    if any(_has_room(instances[pos], request, config) for pos in positions):
        return _ADMIT
    candidates = _entry_instances(snapshot)
    backlog = min(inst.queued_prefill_tokens for inst in candidates)
    retry_after_s = max(1.0, backlog / config.prefill_tokens_per_s)
    action = on_overload if on_overload is not None else config.on_overload
    if action is OverloadAction.QUEUE:
        if router_queue_depth < config.max_router_queue:
            return AdmissionDecision(AdmissionOutcome.QUEUE, RejectReason.OVERLOADED, retry_after_s)
        return AdmissionDecision(AdmissionOutcome.REJECT, RejectReason.QUEUE_FULL, retry_after_s)
    if action is OverloadAction.DEGRADE:
        # Degraded service still runs the request, on whichever instance is least loaded.
        return _ADMIT
    return AdmissionDecision(AdmissionOutcome.REJECT, RejectReason.OVERLOADED, retry_after_s)
