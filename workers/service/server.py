"""gRPC servicers of the worker services and a server that runs them on its own thread.

The server runs ``grpc.aio`` on a private event loop in a daemon thread, so a
worker (a Ray actor, a test, a script) can start it with one call and keep its
own thread free. Worker errors become gRPC status codes the router maps back:
INVALID_ARGUMENT for a request no worker can ever serve (a token id outside
the vocabulary, bad sampling values, an empty or too long prompt),
FAILED_PRECONDITION for a request this worker cannot take, NOT_FOUND for an
unknown request, RESOURCE_EXHAUSTED when KV blocks are short, ABORTED when the
KV transfer failed, UNAVAILABLE when the engine loop has stopped (the router
hands the request to another worker), INTERNAL otherwise.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import grpc

from protos.pdserve.v1 import worker_pb2 as pb
from protos.pdserve.v1 import worker_pb2_grpc as pb_grpc
from workers.engine.outputs import DuplicateRequest, InvalidRequest, WrongRole
from workers.engine.outputs import UnknownRequest as EngineUnknownRequest
from workers.engine.sampling_params import InvalidSamplingParams
from workers.kv.errors import KVTransferError, sending_side_fault
from workers.service import convert
from workers.service.abandon import outlive_caller
from workers.service.decode import DecodeWorker, NoRoom, UnknownRequest, WorkerError
from workers.service.engine_loop import EngineStopped
from workers.service.prefill import PrefillWorker
from workers.service.types import GenerateMode

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.so_reuseport", 0),
]


async def _fail(context: grpc.aio.ServicerContext, exc: BaseException, *, sending_kv: bool = False) -> None:
    """Abort the call with the status ``exc`` maps to; ``sending_kv``: the call sent a KV transfer, so a
    transfer error also says which side failed (trailing metadata, see ``convert.fault_to_metadata``)."""
    metadata: tuple[tuple[str, str], ...] = ()
    if isinstance(exc, EngineStopped):  # this worker serves nothing more; another one can
        code = grpc.StatusCode.UNAVAILABLE
    elif isinstance(exc, UnknownRequest | EngineUnknownRequest):  # e.g. a reservation reaped as it was joined
        code = grpc.StatusCode.NOT_FOUND
    elif isinstance(exc, NoRoom):
        code = grpc.StatusCode.RESOURCE_EXHAUSTED
    elif isinstance(exc, KVTransferError):
        code = grpc.StatusCode.ABORTED
        if sending_kv:
            metadata = convert.fault_to_metadata(sending_side_fault(exc))
    elif isinstance(exc, (InvalidRequest, InvalidSamplingParams)) and not isinstance(exc, (DuplicateRequest, WrongRole)):
        code = grpc.StatusCode.INVALID_ARGUMENT  # the client's input: no worker could serve it
    elif isinstance(exc, (WorkerError, ValueError)):
        code = grpc.StatusCode.FAILED_PRECONDITION
    else:
        code = grpc.StatusCode.INTERNAL
    await context.abort(code, f"{type(exc).__name__}: {exc}", trailing_metadata=metadata)


class ControlServicer(pb_grpc.WorkerControlServicer):
    """Abort, GetLoad and Health of either worker kind."""

    def __init__(self, worker: DecodeWorker | PrefillWorker) -> None:
        self.worker = worker

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        return pb.AbortResponse(found=self.worker.abort(request.request_id))

    async def GetLoad(self, request: pb.GetLoadRequest, context: grpc.aio.ServicerContext) -> pb.LoadReport:
        try:
            load = await asyncio.to_thread(self.worker.load)
        except Exception as exc:
            await _fail(context, exc)
            raise
        return convert.load_to_pb(load)

    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthResponse:
        return pb.HealthResponse(serving=self.worker.healthy, instance_id=self.worker.instance_id)


class PrefillServicer(pb_grpc.PrefillServicer):
    """Prefill of a prefill worker."""

    def __init__(self, worker: PrefillWorker) -> None:
        self.worker = worker

    async def Prefill(self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext) -> pb.PrefillResponse:
        try:
            result = await self.worker.prefill(
                request.request_id,
                tuple(request.prompt_token_ids),
                convert.sampling_from_pb(request.sampling),
                convert.descriptor_from_pb(request.descriptor),
            )
        except Exception as exc:
            await _fail(context, exc, sending_kv=True)
            raise
        return convert.prefill_result_to_pb(result)


class DecodeServicer(pb_grpc.DecodeServicer):
    """ReserveKV, Generate and Resume of a decode worker."""

    def __init__(self, worker: DecodeWorker) -> None:
        self.worker = worker

    async def ReserveKV(self, request: pb.ReserveKVRequest, context: grpc.aio.ServicerContext) -> pb.ReserveKVResponse:
        rid = request.request_id
        reserving = asyncio.ensure_future(asyncio.to_thread(
            self.worker.reserve, rid, tuple(request.prompt_token_ids), request.timeout_s or 30.0,
            request.max_tokens or None,
        ))
        try:
            # a reservation the router gave up on (it left, or its deadline passed) is given back as soon as
            # it exists, instead of holding its blocks until it expires
            res = await outlive_caller(reserving, lambda _: self.worker.abort(rid))
        except Exception as exc:
            await _fail(context, exc)
            raise
        return convert.reservation_to_pb(res)

    async def _relay(self, chunks: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[pb.TokenEvent]:
        try:
            async for chunk in chunks:
                yield convert.chunk_to_pb(chunk)
        except Exception as exc:
            await _fail(context, exc)

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TokenEvent]:
        prompt = tuple(request.prompt_token_ids)
        try:
            mode = convert.mode_from_pb(request.mode)
        except ValueError as exc:
            await _fail(context, exc)
            return
        try:
            sampling = convert.sampling_from_pb(request.sampling)
            if mode is GenerateMode.AFTER_TRANSFER and not request.HasField("first_token_id"):
                raise WorkerError("AFTER_TRANSFER needs first_token_id")
        except (ValueError, WorkerError) as exc:
            if mode is GenerateMode.AFTER_TRANSFER:
                # this call never takes the reservation: give its blocks back now, not when it expires
                self.worker.cancel_reservation(request.request_id)
            await _fail(context, exc)
            return
        if mode is GenerateMode.AFTER_TRANSFER:
            chunks = self.worker.generate_after_transfer(
                request.request_id, prompt, request.first_token_id, sampling, request.transfer_timeout_s or 30.0
            )
        else:
            chunks = self.worker.generate_local(request.request_id, prompt, sampling)
        async for event in self._relay(chunks, context):
            yield event

    async def Resume(self, request: pb.ResumeRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.TokenEvent]:
        try:
            sampling = convert.sampling_from_pb(request.sampling)
        except ValueError as exc:
            await _fail(context, exc)
            return
        chunks = self.worker.resume(
            request.request_id, tuple(request.prompt_token_ids), tuple(request.generated_token_ids), sampling
        )
        async for event in self._relay(chunks, context):
            yield event


class WorkerServer:
    """A grpc.aio server for one worker, on a private event loop in a daemon thread."""

    def __init__(self, worker: DecodeWorker | PrefillWorker, host: str = "127.0.0.1", port: int = 0) -> None:
        self.worker = worker
        self._host = host
        self._port = port
        self._loop = asyncio.new_event_loop()
        self._server: grpc.aio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="grpc-server", daemon=True)
        self.address = ""

    async def _start(self) -> str:
        server = grpc.aio.server(options=GRPC_OPTIONS)
        pb_grpc.add_WorkerControlServicer_to_server(ControlServicer(self.worker), server)
        if isinstance(self.worker, DecodeWorker):
            pb_grpc.add_DecodeServicer_to_server(DecodeServicer(self.worker), server)
        else:
            pb_grpc.add_PrefillServicer_to_server(PrefillServicer(self.worker), server)
        port = server.add_insecure_port(f"{self._host}:{self._port}")
        if port == 0:
            raise OSError(f"cannot bind gRPC server to {self._host}:{self._port}")
        await server.start()
        self._server = server
        return f"{self._host}:{port}"

    def start(self) -> str:
        """Start serving; returns the bound "host:port"."""
        self._thread.start()
        self.address = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return self.address

    def stop(self, grace_s: float = 1.0) -> None:
        """Stop serving (in-flight calls get ``grace_s``) and end the thread."""
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.stop(grace_s), self._loop).result(timeout=grace_s + 5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
