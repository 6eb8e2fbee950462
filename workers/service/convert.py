"""The one place protobuf messages turn into pdserve dataclasses and back.

Everything above this module (worker services, router clients) sees only
``SamplingParams``, ``TransferDescriptor``, ``TokenChunk``, ``InstanceLoad``
and friends; generated ``*_pb2`` types never cross it.
"""

from __future__ import annotations

from collections.abc import Iterable

from orchestrator.core.types import InstanceHealth, InstanceLoad, Role
from protos.pdserve.v1 import worker_pb2 as pb
from workers.engine.sampling_params import SamplingParams
from workers.kv.descriptor import TransferDescriptor, TransferStats, TransportKind
from workers.kv.errors import TransferFault
from workers.service.types import GenerateMode, PrefillResult, Reservation, StreamFinish, TokenChunk

_FINISH_TO_PB = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    StreamFinish.STOP: pb.FINISH_REASON_STOP,
    StreamFinish.LENGTH: pb.FINISH_REASON_LENGTH,
    StreamFinish.ABORT: pb.FINISH_REASON_ABORT,
}
_FINISH_FROM_PB = {v: k for k, v in _FINISH_TO_PB.items()}
_ROLE_TO_PB = {
    Role.PREFILL: pb.WORKER_ROLE_PREFILL,
    Role.DECODE: pb.WORKER_ROLE_DECODE,
    Role.COLOCATED: pb.WORKER_ROLE_COLOCATED,
}
_ROLE_FROM_PB = {v: k for k, v in _ROLE_TO_PB.items()}
_MODE_TO_PB = {
    GenerateMode.AFTER_TRANSFER: pb.GENERATE_MODE_AFTER_TRANSFER,
    GenerateMode.LOCAL_PREFILL: pb.GENERATE_MODE_LOCAL_PREFILL,
}
_MODE_FROM_PB = {v: k for k, v in _MODE_TO_PB.items()}


class ProtocolError(ValueError):
    """A message is missing a field or holds a value this version does not know."""


# Trailing metadata of a failed Prefill call: which side its KV transfer's error points at. A
# status detail is text for people; the router decides whom to avoid from this key alone.
KV_FAULT_KEY = "pdserve-kv-fault"


def fault_to_metadata(fault: TransferFault) -> tuple[tuple[str, str], ...]:
    """Trailing metadata that carries ``fault``."""
    return ((KV_FAULT_KEY, fault.value),)


def fault_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> TransferFault:
    """The fault a call's trailing metadata names; UNKNOWN when it names none (or one this version lacks)."""
    for key, value in metadata or ():
        if key == KV_FAULT_KEY:
            text = value.decode() if isinstance(value, bytes) else value
            try:
                return TransferFault(text)
            except ValueError:
                return TransferFault.UNKNOWN
    return TransferFault.UNKNOWN


def sampling_to_pb(params: SamplingParams) -> pb.SamplingParams:
    """SamplingParams -> proto."""
    msg = pb.SamplingParams(
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        stop_token_ids=params.stop_token_ids,
        stop=params.stop,
        ignore_eos=params.ignore_eos,
    )
    if params.seed is not None:
        msg.seed = params.seed
    return msg


def sampling_from_pb(msg: pb.SamplingParams) -> SamplingParams:
    """Proto -> SamplingParams (validated by its constructor)."""
    return SamplingParams(
        max_tokens=msg.max_tokens,
        temperature=msg.temperature,
        top_p=msg.top_p,
        top_k=msg.top_k,
        seed=msg.seed if msg.HasField("seed") else None,
        stop_token_ids=tuple(msg.stop_token_ids),
        stop=tuple(msg.stop),
        ignore_eos=msg.ignore_eos,
    )


def descriptor_to_pb(desc: TransferDescriptor) -> pb.TransferDescriptor:
    """TransferDescriptor -> proto."""
    return pb.TransferDescriptor(
        request_id=desc.request_id,
        kind=desc.kind.value,
        address=desc.address,
        num_tokens=desc.num_tokens,
        num_layers=desc.num_layers,
        num_kv_heads=desc.num_kv_heads,
        head_dim=desc.head_dim,
        dtype=desc.dtype,
        device=desc.device,
        host_id=desc.host_id,
    )


def descriptor_from_pb(msg: pb.TransferDescriptor) -> TransferDescriptor:
    """Proto -> TransferDescriptor; its constructor validates the fields."""
    try:
        kind = TransportKind(msg.kind)
    except ValueError:
        raise ProtocolError(f"unknown transport kind {msg.kind!r} in transfer descriptor") from None
    return TransferDescriptor(
        request_id=msg.request_id,
        kind=kind,
        address=msg.address,
        num_tokens=msg.num_tokens,
        num_layers=msg.num_layers,
        num_kv_heads=msg.num_kv_heads,
        head_dim=msg.head_dim,
        dtype=msg.dtype,
        device=msg.device or "cpu",
        host_id=msg.host_id,
    )


def reservation_to_pb(res: Reservation) -> pb.ReserveKVResponse:
    """Reservation -> proto."""
    return pb.ReserveKVResponse(descriptor=descriptor_to_pb(res.descriptor), num_blocks=res.num_blocks)


def reservation_from_pb(msg: pb.ReserveKVResponse) -> Reservation:
    """Proto -> Reservation."""
    if not msg.HasField("descriptor"):
        raise ProtocolError("ReserveKVResponse without a descriptor")
    return Reservation(descriptor=descriptor_from_pb(msg.descriptor), num_blocks=msg.num_blocks)


def stats_to_pb(stats: TransferStats) -> pb.TransferStats:
    """TransferStats -> proto."""
    return pb.TransferStats(
        request_id=stats.request_id,
        kind=stats.kind.value,
        num_bytes=stats.num_bytes,
        num_layers=stats.num_layers,
        seconds=stats.seconds,
        blocked_s=stats.blocked_s,
        wire_s=stats.wire_s,
    )


def stats_from_pb(msg: pb.TransferStats) -> TransferStats:
    """Proto -> TransferStats."""
    return TransferStats(
        request_id=msg.request_id,
        kind=TransportKind(msg.kind),
        num_bytes=msg.num_bytes,
        num_layers=msg.num_layers,
        seconds=msg.seconds,
        blocked_s=msg.blocked_s,
        wire_s=msg.wire_s,
    )


def prefill_result_to_pb(result: PrefillResult) -> pb.PrefillResponse:
    """PrefillResult -> proto."""
    msg = pb.PrefillResponse(first_token_id=result.first_token_id, first_text=result.first_text)
    if result.transfer is not None:
        msg.transfer.CopyFrom(stats_to_pb(result.transfer))
    return msg


def prefill_result_from_pb(msg: pb.PrefillResponse) -> PrefillResult:
    """Proto -> PrefillResult."""
    transfer = stats_from_pb(msg.transfer) if msg.HasField("transfer") else None
    return PrefillResult(first_token_id=msg.first_token_id, first_text=msg.first_text, transfer=transfer)


def chunk_to_pb(chunk: TokenChunk) -> pb.TokenEvent:
    """TokenChunk -> proto."""
    return pb.TokenEvent(
        token_ids=chunk.token_ids,
        text=chunk.text,
        finish_reason=_FINISH_TO_PB[chunk.finish],
        num_prompt_tokens=chunk.num_prompt_tokens,
        num_output_tokens=chunk.num_output_tokens,
    )


def chunk_from_pb(msg: pb.TokenEvent) -> TokenChunk:
    """Proto -> TokenChunk."""
    try:
        finish = _FINISH_FROM_PB[msg.finish_reason]
    except KeyError:
        raise ProtocolError(f"unknown finish reason {msg.finish_reason}") from None
    return TokenChunk(
        token_ids=tuple(msg.token_ids),
        text=msg.text,
        finish=finish,
        num_prompt_tokens=msg.num_prompt_tokens,
        num_output_tokens=msg.num_output_tokens,
    )


def mode_to_pb(mode: GenerateMode) -> pb.GenerateMode:
    """GenerateMode -> proto enum."""
    return _MODE_TO_PB[mode]


def mode_from_pb(value: int) -> GenerateMode:
    """Proto enum -> GenerateMode."""
    try:
        return _MODE_FROM_PB[value]  # type: ignore[index]
    except KeyError:
        raise ProtocolError(f"unknown generate mode {value}") from None


def load_to_pb(load: InstanceLoad) -> pb.LoadReport:
    """InstanceLoad -> LoadReport (health is the controller's to judge, not reported)."""
    msg = pb.LoadReport(
        instance_id=load.instance_id,
        role=_ROLE_TO_PB[load.role],
        node_id=load.node_id,
        queued_prefill_tokens=load.queued_prefill_tokens,
        waiting_requests=load.waiting_requests,
        running_requests=load.running_requests,
        free_kv_blocks=load.free_kv_blocks,
        total_kv_blocks=load.total_kv_blocks,
        block_size=load.block_size,
        max_running_requests=load.max_running_requests,
    )
    if load.recent_ttft_s is not None:
        msg.recent_ttft_s = load.recent_ttft_s
    if load.recent_tpot_s is not None:
        msg.recent_tpot_s = load.recent_tpot_s
    return msg


def load_from_pb(msg: pb.LoadReport, reported_at_s: float) -> InstanceLoad:
    """LoadReport -> InstanceLoad, stamped with the time the controller received it."""
    try:
        role = _ROLE_FROM_PB[msg.role]
    except KeyError:
        raise ProtocolError(f"load report of {msg.instance_id!r} has no valid role") from None
    return InstanceLoad(
        instance_id=msg.instance_id,
        role=role,
        node_id=msg.node_id,
        health=InstanceHealth.HEALTHY,
        queued_prefill_tokens=msg.queued_prefill_tokens,
        waiting_requests=msg.waiting_requests,
        running_requests=msg.running_requests,
        free_kv_blocks=msg.free_kv_blocks,
        total_kv_blocks=msg.total_kv_blocks,
        block_size=msg.block_size or 16,
        max_running_requests=msg.max_running_requests,
        recent_ttft_s=msg.recent_ttft_s if msg.HasField("recent_ttft_s") else None,
        recent_tpot_s=msg.recent_tpot_s if msg.HasField("recent_tpot_s") else None,
        reported_at_s=reported_at_s,
    )
