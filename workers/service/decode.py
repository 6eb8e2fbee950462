"""The decode worker: reserves KV, receives it layer by layer, decodes and streams tokens.

A disaggregated request on this worker:
1. ``reserve``: the engine reserves blocks for the prompt and the transport
   endpoint expects the transfer; every arriving layer (checksummed by the
   transport) is copied and written into the reserved blocks on the engine
   thread. The descriptor goes back to the router.
2. ``generate`` (AFTER_TRANSFER): wait for the receiver to report every layer
   landed, then join the request to the continuous batch with the first token
   the prefill worker produced, and stream the following tokens.
A reservation nobody claims within its timeout is cancelled and its blocks freed.
``generate`` in LOCAL_PREFILL mode and ``resume`` (failover) prefill here.

A request id names one request at a time here: while it has a reservation or a
Generate/Resume call in progress, another Reserve, Generate or Resume with that id
is refused with ``DuplicateRequest`` and the first one goes on untouched. Once a
stream ends (finished, aborted, or its caller gone) the id is free again.

Once the engine loop stops (a step raised, or the worker is closing), reserve,
generate, resume and load fail with ``EngineStopped``, open streams included:
another worker can take the request over.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from contextlib import aclosing, contextmanager, suppress
from dataclasses import dataclass
from typing import Any

from orchestrator.core.types import InstanceLoad, Role
from workers.engine.block_manager import OutOfKVBlocks
from workers.engine.outputs import DuplicateRequest, InvalidRequest
from workers.engine.sampling_params import SamplingParams
from workers.kv.interface import KVEndpoint, KVReceiver, KVSpec
from workers.service.abandon import outlive_caller
from workers.service.engine_loop import EngineLoop, EngineStopped
from workers.service.types import Reservation, StreamFinish, TokenChunk


class WorkerError(RuntimeError):
    """A request cannot be served by this worker; the message says why."""


class NoRoom(WorkerError):
    """Not enough free KV blocks right now; retry later or elsewhere."""


class UnknownRequest(WorkerError):
    """No reservation or stream with this request id exists here."""


@dataclass
class _Pending:
    receiver: KVReceiver
    num_tokens: int
    expires_at_s: float


def kv_spec(engine: Any) -> KVSpec:
    """The transport's view of the engine's KV layout."""
    layout = engine.kv_layout
    return KVSpec(
        num_layers=layout.num_layers,
        num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
        dtype=str(layout.dtype).removeprefix("torch."),
    )


def finish_of(reason: object) -> StreamFinish:
    """The engine's finish reason (an enum or a string) as a StreamFinish."""
    value = getattr(reason, "value", reason)
    return StreamFinish(value) if value in {f.value for f in StreamFinish} else StreamFinish.STOP


def engine_load(engine: Any, instance_id: str, role: Role, node_id: str) -> InstanceLoad:
    """Read the engine's load counters (call on the engine thread)."""
    return InstanceLoad(
        instance_id=instance_id,
        role=role,
        node_id=node_id,
        queued_prefill_tokens=int(engine.queued_prefill_tokens),
        waiting_requests=int(engine.num_waiting),
        running_requests=int(engine.num_running),
        free_kv_blocks=int(engine.free_blocks),
        total_kv_blocks=int(engine.total_blocks),
        block_size=int(engine.kv_layout.block_size),
        max_running_requests=int(engine.config.max_num_seqs),
    )


class DecodeWorker:
    """Plain decode worker over an engine loop and a KV endpoint (no gRPC, no Ray)."""

    def __init__(self, loop: EngineLoop, endpoint: KVEndpoint, instance_id: str, node_id: str = "node-0") -> None:
        self.loop = loop
        self.endpoint = endpoint
        self.instance_id = instance_id
        self.node_id = node_id
        self._spec = loop.call(kv_spec)
        self._pending: dict[str, _Pending] = {}
        self._waiting: dict[str, _Pending] = {}  # reservations whose Generate waits for the KV to land
        self._calls: set[str] = set()  # requests with a Generate or Resume call in progress here
        self._streams: set[str] = set()  # of those, the ones joined to the engine (``abort`` ends them)
        self._lock = threading.Lock()

    @contextmanager
    def _claim(self, request_id: str) -> Iterator[None]:
        """Hold ``request_id`` for one Generate or Resume call; a second call with it is refused."""
        with self._lock:
            if request_id in self._calls:
                raise DuplicateRequest(f"request {request_id!r} is already streaming on {self.instance_id}")
            self._calls.add(request_id)
        try:
            yield
        finally:
            with self._lock:
                self._calls.discard(request_id)

    # --- disaggregated path -------------------------------------------------------------
    def reserve(
        self, request_id: str, prompt_token_ids: tuple[int, ...], timeout_s: float, max_tokens: int | None = None
    ) -> Reservation:
        """Reserve blocks for the prompt and open a receiver; returns its descriptor.

        ``max_tokens`` (the request's output budget, when known) only guides block placement.
        """
        # a reservation that never expires holds its blocks for good if its Generate never comes
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise InvalidRequest(f"reservation timeout_s must be a positive number of seconds, got {timeout_s!r}")
        num_tokens = len(prompt_token_ids)
        if num_tokens < 1:
            raise InvalidRequest("prompt_token_ids must not be empty")
        self._reap()
        with self._lock:
            if request_id in self._pending:
                raise DuplicateRequest(f"request {request_id!r} has a reservation on {self.instance_id}")
            if request_id in self._calls:
                raise DuplicateRequest(f"request {request_id!r} is already streaming on {self.instance_id}")
        try:
            # No timeout: a reservation made after its caller stopped waiting would hold its blocks
            # with no _pending entry to free them. A caller that leaves (ReserveKV cancelled) has
            # what it reserved given back once this returns (server.ReserveKV).
            blocks = self.loop.submit(lambda e: e.reserve(request_id, num_tokens, max_tokens)).result()
        except OutOfKVBlocks as exc:
            raise NoRoom(f"cannot reserve KV for {num_tokens} tokens now: {exc}") from exc
        except (InvalidRequest, EngineStopped):  # the input itself (too long, a duplicate id), or a dead engine
            raise
        except Exception as exc:
            raise WorkerError(f"cannot reserve KV for {num_tokens} tokens: {exc}") from exc

        def on_layer(layer: int, k: Any, v: Any) -> None:
            # private copies (keep=True): the engine thread writes them later
            self.loop.submit(lambda e: e.write_layer_kv(request_id, layer, k, v))

        try:
            receiver = self.endpoint.expect(request_id, num_tokens, self._spec, on_layer, keep=True)
        except Exception:
            self.loop.submit(lambda e: e.release(request_id))
            raise
        with self._lock:
            self._pending[request_id] = _Pending(receiver, num_tokens, time.monotonic() + timeout_s)
        return Reservation(descriptor=receiver.descriptor, num_blocks=len(blocks))

    def _reap(self) -> None:
        """Cancel reservations whose Generate never came (the router gave up on them)."""
        now = time.monotonic()
        with self._lock:
            expired = [rid for rid, p in self._pending.items() if p.expires_at_s < now]
            pending = [self._pending.pop(rid) for rid in expired]
        for rid, p in zip(expired, pending, strict=True):
            self._cancel(rid, p)

    def _cancel(self, request_id: str, pending: _Pending) -> None:
        """Stop expecting a reservation's KV and free its blocks (its entry already taken out)."""
        pending.receiver.cancel()
        self.loop.submit(lambda e: e.release(request_id))

    def cancel_reservation(self, request_id: str) -> bool:
        """Give back ``request_id``'s reservation if no Generate has taken it yet; whether there was one."""
        with self._lock:
            pending = self._pending.pop(request_id, None)
        if pending is None:
            return False
        self._cancel(request_id, pending)
        return True

    async def generate_after_transfer(
        self,
        request_id: str,
        prompt_token_ids: tuple[int, ...],
        first_token_id: int,
        sampling: SamplingParams,
        transfer_timeout_s: float,
    ) -> AsyncIterator[TokenChunk]:
        """Wait for the KV to land, join the batch with the first token, stream the rest."""
        with self._claim(request_id):
            with self._lock:
                pending = self._pending.pop(request_id, None)
                if pending is not None:
                    self._waiting[request_id] = pending  # where abort() finds it while the KV lands
            if pending is None:
                raise UnknownRequest(f"no KV reservation for request {request_id!r}")
            try:
                await asyncio.to_thread(pending.receiver.wait, transfer_timeout_s)
            except BaseException:
                with self._lock:
                    self._waiting.pop(request_id, None)
                pending.receiver.cancel()
                self.loop.submit(lambda e: e.release(request_id))
                raise
            with self._lock:
                landed = self._waiting.pop(request_id, None) is not None
                if landed:  # streaming from here on, for abort(): its engine abort then runs before the join
                    self._streams.add(request_id)
            if not landed:  # aborted as the last layer landed: end as an abort would have ended the stream
                self.loop.submit(lambda e: e.release(request_id))
                yield TokenChunk((), "", StreamFinish.ABORT, num_prompt_tokens=len(prompt_token_ids))
                return
            prompt = list(prompt_token_ids)

            def join(engine: Any) -> None:
                try:
                    engine.add_prefilled_request(request_id, prompt, first_token_id, sampling)
                except BaseException:
                    with suppress(LookupError):  # the reservation is this call's: nobody else would free it
                        engine.release(request_id)
                    raise

            async with aclosing(self._stream(request_id, join)) as chunks:
                async for chunk in chunks:
                    yield chunk

    # --- local prefill and failover -------------------------------------------------------
    async def generate_local(
        self, request_id: str, prompt_token_ids: tuple[int, ...], sampling: SamplingParams
    ) -> AsyncIterator[TokenChunk]:
        """Prefill and decode here."""
        prompt = list(prompt_token_ids)
        with self._claim(request_id):
            # closed here, not when collected: its cleanup must be queued before the claim is given back
            async with aclosing(
                self._stream(request_id, lambda e: e.add_request(request_id, prompt, sampling))
            ) as chunks:
                async for chunk in chunks:
                    yield chunk

    async def resume(
        self,
        request_id: str,
        prompt_token_ids: tuple[int, ...],
        generated_token_ids: tuple[int, ...],
        sampling: SamplingParams,
    ) -> AsyncIterator[TokenChunk]:
        """Continue a request another worker started: recompute prompt + tokens so far, decode on."""
        prompt, generated = list(prompt_token_ids), list(generated_token_ids)
        with self._claim(request_id):
            async with aclosing(
                self._stream(request_id, lambda e: e.resume_request(request_id, prompt, generated, sampling))
            ) as chunks:
                async for chunk in chunks:
                    yield chunk

    async def _stream(
        self, request_id: str, start: Callable[[Any], None]
    ) -> AsyncGenerator[TokenChunk, None]:
        """Run ``start`` on the engine thread and stream the request's outputs; the caller holds the claim."""
        aloop = asyncio.get_running_loop()
        outputs: asyncio.Queue[Any] = asyncio.Queue()

        def deliver(out: Any) -> None:
            aloop.call_soon_threadsafe(outputs.put_nowait, out)

        def attach_and_start(engine: Any) -> None:
            # Attached on the engine thread, after an earlier request with this id was dropped: outputs
            # of that request (even from a step already running) never reach this stream.
            self.loop.attach(request_id, deliver)
            start(engine)

        finished = False
        with self._lock:
            self._streams.add(request_id)
        joined = self.loop.submit(attach_and_start)
        try:
            # start runs even if the caller leaves meanwhile: the cleanup below must know whether it joined
            await outlive_caller(joined, lambda _: None)
            while True:
                out = await outputs.get()
                if out is None:
                    raise EngineStopped(f"engine of {self.instance_id} stopped")
                finished = bool(out.finished)
                yield TokenChunk(
                    token_ids=tuple(out.new_token_ids),
                    text=out.new_text or "",
                    finish=finish_of(out.finish_reason) if finished else None,
                    num_prompt_tokens=int(out.num_prompt_tokens),
                    num_output_tokens=int(out.num_output_tokens),
                )
                if finished:
                    return
        finally:
            with self._lock:
                self._streams.discard(request_id)
            self.loop.detach(request_id)
            if not finished:  # the caller went away or the stream failed: free the request
                self.loop.submit(lambda e: self._forget(e, request_id, joined))

    def _forget(self, engine: Any, request_id: str, joined: Future[None]) -> None:
        """On the engine thread: drop a request whose stream ended early, if its start joined it.

        Commands run in order, so ``joined`` is done here. A start the engine refused (the id is
        another caller's reservation) added nothing, and that reservation must stay.
        """
        self.loop.detach(request_id)  # attached after the stream's own detach if its caller left early
        if joined.done() and not joined.cancelled() and joined.exception() is None:
            engine.drop(request_id)

    # --- control ----------------------------------------------------------------------
    def abort(self, request_id: str) -> bool:
        """Stop ``request_id`` here (reservation or running stream); whether it was known."""
        with self._lock:
            pending = self._pending.pop(request_id, None)
            waiting = self._waiting.pop(request_id, None)
            streaming = request_id in self._streams
            if streaming:
                # Queued under the lock, so it runs before a later stream with this id can start.
                # The engine's final ABORT output ends the stream, so its reader is never left waiting.
                self.loop.submit(lambda e: e.abort(request_id))
        if waiting is not None:  # its Generate's wait fails and gives the blocks back
            waiting.receiver.cancel()
            return True
        if pending is not None:
            self._cancel(request_id, pending)
            return True
        return streaming

    def load(self) -> InstanceLoad:
        """Current load report."""
        self._reap()
        return self.loop.call(lambda e: engine_load(e, self.instance_id, Role.DECODE, self.node_id), timeout_s=5.0)

    @property
    def healthy(self) -> bool:
        """Whether the engine loop still runs."""
        return self.loop.alive

    def close(self) -> None:
        """Stop the endpoint and the engine loop."""
        self.endpoint.close()
        self.loop.stop()
