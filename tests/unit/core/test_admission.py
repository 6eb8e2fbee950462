"""Admission policy: admit, queue or reject with a reason."""

from __future__ import annotations

from orchestrator.core.admission import AdmissionConfig, AdmissionOutcome, RejectReason, admit, context_window
from orchestrator.core.slo import OverloadAction
from orchestrator.core.types import ClusterSnapshot, InstanceHealth, InstanceLoad, RequestInfo, Role


def _req(prompt_tokens: int = 100, max_output_tokens: int = 16) -> RequestInfo:
    return RequestInfo("r", prompt_tokens=prompt_tokens, max_output_tokens=max_output_tokens, arrival_s=0.0)


def _snap(*queued: int) -> ClusterSnapshot:
    insts = [InstanceLoad(f"p{i}", Role.PREFILL, queued_prefill_tokens=q) for i, q in enumerate(queued)]
    insts.append(InstanceLoad("d0", Role.DECODE, free_kv_blocks=10, total_kv_blocks=10))
    return ClusterSnapshot(at_s=0.0, instances=tuple(insts))


def test_admits_when_any_prefill_has_room() -> None:
    config = AdmissionConfig(max_queued_prefill_tokens=1000)
    decision = admit(_snap(1000, 500), _req(), config)
    assert decision.outcome is AdmissionOutcome.ADMIT and decision.reason is None


def test_prompt_beyond_context_is_rejected_whatever_the_load() -> None:
    config = AdmissionConfig(max_context_tokens=512)
    decision = admit(_snap(0), _req(prompt_tokens=500, max_output_tokens=13), config)
    assert decision.outcome is AdmissionOutcome.REJECT
    assert decision.reason is RejectReason.PROMPT_TOO_LONG
    assert admit(_snap(0), _req(prompt_tokens=500, max_output_tokens=12), config).outcome is AdmissionOutcome.ADMIT


def test_overload_queues_then_rejects_when_router_queue_is_full() -> None:
    config = AdmissionConfig(max_queued_prefill_tokens=1000, max_router_queue=2, prefill_tokens_per_s=100.0)
    queued = admit(_snap(990, 995), _req(), config, router_queue_depth=1)
    assert queued.outcome is AdmissionOutcome.QUEUE and queued.reason is RejectReason.OVERLOADED
    assert queued.retry_after_s == 9.9
    full = admit(_snap(990, 995), _req(), config, router_queue_depth=2)
    assert full.outcome is AdmissionOutcome.REJECT and full.reason is RejectReason.QUEUE_FULL


def test_class_overload_action_overrides_default() -> None:
    config = AdmissionConfig(max_queued_prefill_tokens=10)
    rejected = admit(_snap(10), _req(), config, on_overload=OverloadAction.REJECT)
    assert rejected.outcome is AdmissionOutcome.REJECT and rejected.reason is RejectReason.OVERLOADED
    degraded = admit(_snap(10), _req(), config, on_overload=OverloadAction.DEGRADE)
    assert degraded.outcome is AdmissionOutcome.ADMIT


def test_no_healthy_instance_is_an_explicit_rejection() -> None:
    snap = ClusterSnapshot(
        at_s=0.0, instances=(InstanceLoad("p0", Role.PREFILL, health=InstanceHealth.UNHEALTHY),)
    )
    decision = admit(snap, _req(), AdmissionConfig())
    assert decision.outcome is AdmissionOutcome.REJECT and decision.reason is RejectReason.NO_INSTANCES


def test_waiting_request_limit_counts_as_full() -> None:
    snap = ClusterSnapshot(
        at_s=0.0, instances=(InstanceLoad("p0", Role.PREFILL, waiting_requests=4),)
    )
    config = AdmissionConfig(max_waiting_requests=4, on_overload=OverloadAction.REJECT)
    assert admit(snap, _req(), config).reason is RejectReason.OVERLOADED


def test_the_context_window_is_the_model_positions_capped_by_the_smallest_kv_cache() -> None:
    def inst(name: str, role: Role, blocks: int, block_size: int = 16) -> InstanceLoad:
        return InstanceLoad(name, role, total_kv_blocks=blocks, free_kv_blocks=blocks, block_size=block_size)

    roomy = ClusterSnapshot(0.0, (inst("p0", Role.PREFILL, 1024), inst("d0", Role.DECODE, 512)))
    assert context_window(4096, roomy) == 4096
    small = ClusterSnapshot(0.0, (inst("p0", Role.PREFILL, 1024), inst("d0", Role.DECODE, 4), inst("d1", Role.DECODE, 9, 8)))
    assert context_window(4096, small) == 64
    unreported = ClusterSnapshot(0.0, (inst("d0", Role.DECODE, 0),))  # no load report yet: nothing to cap by
    assert context_window(4096, unreported) == 4096
