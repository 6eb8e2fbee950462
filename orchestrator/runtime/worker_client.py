"""Async gRPC clients of the worker services, speaking pdserve dataclasses (see ``workers.service.convert``).

One ``WorkerClient`` per worker address, holding one channel. gRPC failures
surface as ``WorkerUnavailable`` (the worker is gone or unreachable: fail over)
or ``WorkerRejected`` (the worker answered but refused or failed this request).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from orchestrator.core.types import InstanceLoad
from protos.pdserve.v1 import worker_pb2 as pb
from protos.pdserve.v1 import worker_pb2_grpc as pb_grpc
from workers.engine.sampling_params import SamplingParams
from workers.kv.descriptor import TransferDescriptor
from workers.kv.errors import TransferFault
from workers.service import convert
from workers.service.server import GRPC_OPTIONS
from workers.service.types import GenerateMode, PrefillResult, Reservation, TokenChunk

# Codes meaning "this worker cannot be reached": the caller should try another one.
_UNREACHABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED}


class WorkerCallError(RuntimeError):
    """A call to a worker failed; ``code`` is the gRPC status."""

    def __init__(self, address: str, method: str, code: grpc.StatusCode | None, detail: str) -> None:
        super().__init__(f"{method} on {address}: {code.name if code else 'error'}: {detail}")
        self.code = code
        self.detail = detail


class WorkerUnavailable(WorkerCallError):
    """The worker is unreachable, died mid-call, or a KV transfer to/from it failed."""


class TransferFailed(WorkerUnavailable):
    """The KV transfer of this request failed (timeout, checksum, peer gone); the workers may be fine.

    ``fault``: the side the sending worker says failed (UNKNOWN where it did not say).
    """

    def __init__(self, address: str, method: str, code: grpc.StatusCode | None, detail: str,
                 fault: TransferFault = TransferFault.UNKNOWN) -> None:
        super().__init__(address, method, code, detail)
        self.fault = fault


class WorkerBusy(WorkerCallError):
    """The worker lacks room (KV blocks) for the request right now; retry later or elsewhere."""


class WorkerRejected(WorkerCallError):
    """The worker answered but could not serve the request (bad input, no room, ...)."""


def _wrap(address: str, method: str, exc: grpc.RpcError) -> WorkerCallError:
    code = exc.code() if hasattr(exc, "code") else None
    detail = exc.details() if hasattr(exc, "details") else str(exc)
    cls: type[WorkerCallError]
    if code is grpc.StatusCode.ABORTED:
        metadata = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
        return TransferFailed(address, method, code, detail or "", convert.fault_from_metadata(metadata))
    elif code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        cls = WorkerBusy
    elif code in _UNREACHABLE or code is None:
        cls = WorkerUnavailable
    else:
        cls = WorkerRejected
    return cls(address, method, code, detail or "")


class WorkerClient:
    """Calls one worker (prefill or decode) over a shared ``grpc.aio`` channel."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._channel = grpc.aio.insecure_channel(address, options=GRPC_OPTIONS)
        self._control = pb_grpc.WorkerControlStub(self._channel)
        self._prefill = pb_grpc.PrefillStub(self._channel)
        self._decode = pb_grpc.DecodeStub(self._channel)

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()

    async def reserve(
        self, request_id: str, prompt: tuple[int, ...], timeout_s: float, max_tokens: int = 0
    ) -> Reservation:
        """Decode.ReserveKV (``max_tokens``: the request's output budget, 0 if unknown)."""
        req = pb.ReserveKVRequest(
            request_id=request_id, prompt_token_ids=prompt, timeout_s=timeout_s, max_tokens=max_tokens
        )
        try:
            return convert.reservation_from_pb(await self._decode.ReserveKV(req, timeout=timeout_s))
        except grpc.RpcError as exc:
            raise _wrap(self.address, "ReserveKV", exc) from None

    async def prefill(
        self,
        request_id: str,
        prompt: tuple[int, ...],
        sampling: SamplingParams,
        descriptor: TransferDescriptor,
        timeout_s: float,
    ) -> PrefillResult:
        """Prefill.Prefill."""
        req = pb.PrefillRequest(
            request_id=request_id,
            prompt_token_ids=prompt,
            sampling=convert.sampling_to_pb(sampling),
            descriptor=convert.descriptor_to_pb(descriptor),
        )
        try:
            return convert.prefill_result_from_pb(await self._prefill.Prefill(req, timeout=timeout_s))
        except grpc.RpcError as exc:
            raise _wrap(self.address, "Prefill", exc) from None

    async def generate(
        self,
        request_id: str,
        prompt: tuple[int, ...],
        sampling: SamplingParams,
        mode: GenerateMode,
        first_token_id: int | None,
        timeout_s: float,
        transfer_timeout_s: float = 30.0,
    ) -> AsyncIterator[TokenChunk]:
        """Decode.Generate: the token stream."""
        req = pb.GenerateRequest(
            request_id=request_id,
            prompt_token_ids=prompt,
            sampling=convert.sampling_to_pb(sampling),
            mode=convert.mode_to_pb(mode),
            transfer_timeout_s=transfer_timeout_s,
        )
        if first_token_id is not None:
            req.first_token_id = first_token_id
        async for chunk in self._stream("Generate", self._decode.Generate(req, timeout=timeout_s)):
            yield chunk

    async def resume(
        self,
        request_id: str,
        prompt: tuple[int, ...],
        generated: tuple[int, ...],
        sampling: SamplingParams,
        timeout_s: float,
    ) -> AsyncIterator[TokenChunk]:
        """Decode.Resume: continue a request from its tokens so far."""
        req = pb.ResumeRequest(
            request_id=request_id,
            prompt_token_ids=prompt,
            generated_token_ids=generated,
            sampling=convert.sampling_to_pb(sampling),
        )
        async for chunk in self._stream("Resume", self._decode.Resume(req, timeout=timeout_s)):
            yield chunk

    async def _stream(self, method: str, call: grpc.aio.UnaryStreamCall) -> AsyncIterator[TokenChunk]:
        try:
            async for msg in call:
                yield convert.chunk_from_pb(msg)
        except grpc.RpcError as exc:
            raise _wrap(self.address, method, exc) from None
        finally:
            call.cancel()  # no-op when finished; frees the worker's stream when the consumer left early

    async def abort(self, request_id: str, timeout_s: float = 2.0) -> bool:
        """WorkerControl.Abort; False when the worker cannot be reached."""
        try:
            resp = await self._control.Abort(pb.AbortRequest(request_id=request_id), timeout=timeout_s)
        except grpc.RpcError:
            return False
        return bool(resp.found)

    async def load(self, reported_at_s: float, timeout_s: float = 2.0) -> InstanceLoad:
        """WorkerControl.GetLoad."""
        try:
            msg = await self._control.GetLoad(pb.GetLoadRequest(), timeout=timeout_s)
        except grpc.RpcError as exc:
            raise _wrap(self.address, "GetLoad", exc) from None
        return convert.load_from_pb(msg, reported_at_s)

    async def health(self, timeout_s: float = 2.0) -> bool:
        """WorkerControl.Health: whether the worker answers and its engine runs."""
        try:
            resp = await self._control.Health(pb.HealthRequest(), timeout=timeout_s)
        except grpc.RpcError:
            return False
        return bool(resp.serving)
