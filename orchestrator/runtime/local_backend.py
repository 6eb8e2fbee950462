"""``LocalEngineBackend``: the in-process ``GenerationBackend`` over one local engine.

Used by tests and development (``pdserve`` without a cluster). One engine
thread owns the engine; nothing else calls it. A request's life:

1. ``generate`` registers an asyncio queue for the request and posts an
   *add* command; the engine thread adds it before its next step;
2. the engine thread calls ``engine.step()`` while any request runs and hands
   each output to the request's queue on the request's event loop
   (``loop.call_soon_threadsafe``);
3. the stream ends with the event that carries ``finish_reason``; an engine
   error ends every running stream with ``GenerationFailed``; a request that
   passes its deadline raises ``DeadlineExceeded`` and is aborted;
4. a consumer that stops early (client gone, deadline) posts an *abort*; an
   ``abort`` from elsewhere ends the stream with ``FinishReason.ABORT``.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from orchestrator.core.clock import Clock
from orchestrator.runtime.backend import (
    BackendError,
    DeadlineExceeded,
    FinishReason,
    GenerationFailed,
    GenerationRequest,
    InvalidRequest,
    TokenEvent,
)
from orchestrator.runtime.http.config import WallClock
from orchestrator.runtime.metrics import ServingMetrics
from workers.engine.sampling_params import SamplingParams


class StepEngine(Protocol):
    """The engine surface this backend drives (``workers.engine.LLMEngine``)."""

    def add_request(self, request_id: str, prompt_token_ids: Sequence[int], sampling: SamplingParams) -> Any:
        """Queue a request."""
        ...

    def abort(self, request_id: str) -> Any:
        """Drop a request and free its KV blocks."""
        ...

    def step(self) -> Sequence[Any]:
        """Run one batch; outputs have ``request_id, new_token_ids, new_text, finished, finish_reason,
        num_prompt_tokens, num_output_tokens``."""
        ...

    def has_unfinished(self) -> bool:
        """Whether a step would still produce outputs (including those of aborted requests)."""
        ...


@runtime_checkable
class EngineLoad(Protocol):
    """Optional: engines that expose their load get it exported as metrics after every step."""

    @property
    def free_blocks(self) -> int:
        """KV blocks on the free list."""
        ...

    @property
    def total_blocks(self) -> int:
        """KV blocks in the cache."""
        ...

    @property
    def num_waiting(self) -> int:
        """Requests waiting for (re)computation."""
        ...


@dataclass(frozen=True, slots=True)
class _Add:
    request: GenerationRequest


@dataclass(frozen=True, slots=True)
class _Abort:
    request_id: str


_Item = TokenEvent | BackendError


@dataclass(frozen=True, slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[_Item]


def _finish_reason(raw: object) -> FinishReason:
    """The engine's finish reason (enum or string) as a ``FinishReason``; unknown ones count as STOP."""
    value = str(getattr(raw, "value", raw)).lower()
    for reason in FinishReason:
        if reason.value == value:
            return reason
    return FinishReason.STOP


class LocalEngineBackend:
    """Serves ``GenerationRequest``s from one in-process engine driven by a dedicated thread."""

    def __init__(
        self,
        engine: StepEngine,
        *,
        clock: Clock | None = None,
        metrics: ServingMetrics | None = None,
        instance: str = "local",
    ) -> None:
        self._engine = engine
        self._clock: Clock = clock if clock is not None else WallClock()
        self._metrics = metrics
        self._instance = instance
        self._reports_load = isinstance(engine, EngineLoad)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._commands: deque[_Add | _Abort] = deque()
        self._streams: dict[str, _Stream] = {}
        self._running: set[str] = set()  # touched by the engine thread only
        self._closed = False
        self._thread: threading.Thread | None = None

    # --- the GenerationBackend protocol --------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Stream ``request``'s tokens from the engine; raises a ``BackendError`` instead of finishing."""
        rid = request.request_id
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if self._closed:
                raise GenerationFailed("the local engine backend is closed")
            if rid in self._streams:
                raise InvalidRequest(f"request id {rid!r} is already running")
            self._streams[rid] = stream
            self._commands.append(_Add(request))
            self._wake.notify()
        self._ensure_thread()
        # The deadline arrives as one more queue item: a plain ``queue.get()`` never swallows a
        # cancellation, unlike ``asyncio.wait_for`` racing a token that lands at the same moment.
        late = DeadlineExceeded(f"request {rid} passed its deadline")
        timer = stream.loop.call_later(
            max(0.0, request.deadline_s - self._clock.now_s()), stream.queue.put_nowait, late
        )
        ended = False
        try:
            while True:
                item = await stream.queue.get()
                if item is late:
                    raise late
                if isinstance(item, BackendError):
                    ended = True  # the engine thread already dropped it
                    raise item
                yield item
                if item.finish_reason is not None:
                    ended = True
                    return
        finally:
            timer.cancel()
            with self._lock:
                self._streams.pop(rid, None)
                if not ended:
                    self._commands.append(_Abort(rid))
                    self._wake.notify()

    def readiness(self) -> str | None:
        """Why no request could be served now (the backend is closed); else None (its thread starts on demand)."""
        return "the local engine backend is closed" if self._closed else None

    async def abort(self, request_id: str) -> None:
        """Stop ``request_id`` in the engine; its stream (if still read) ends with ``ABORT``."""
        with self._lock:
            self._commands.append(_Abort(request_id))
            self._wake.notify()

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        """Requests added to the engine and not yet finished or aborted."""
        return len(self._running)

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the engine thread; streams still open end with ``GenerationFailed``."""
        with self._lock:
            self._closed = True
            self._wake.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
        with self._lock:
            streams = list(self._streams.items())
            self._streams.clear()
        for rid in list(self._running):
            self._engine_abort(rid)
        for _, stream in streams:
            self._post(stream, GenerationFailed("the local engine backend was closed"))

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._loop, name="pdserve-local-engine", daemon=True)
                self._thread.start()

    # --- the engine thread -------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._commands and not self._busy() and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                commands = list(self._commands)
                self._commands.clear()
            for command in commands:
                if isinstance(command, _Add):
                    self._add(command.request)
                else:
                    self._abort_running(command.request_id)
            if self._busy():
                self._step()
            if self._metrics is not None:
                self._report_load(self._metrics)

    def _report_load(self, metrics: ServingMetrics) -> None:
        metrics.set_running_requests(self._instance, "colocated", len(self._running))
        if self._reports_load:
            engine: Any = self._engine
            free = int(engine.free_blocks)
            metrics.set_kv_blocks(self._instance, "colocated", int(engine.total_blocks) - free, free)
            metrics.set_queue_depth("engine_waiting", self._instance, int(engine.num_waiting))

    def _busy(self) -> bool:
        # Aborted requests leave a final output in the engine; stepping drains it.
        return bool(self._running) or self._engine.has_unfinished()

    def _add(self, request: GenerationRequest) -> None:
        rid = request.request_id
        with self._lock:
            still_wanted = rid in self._streams
        if not still_wanted:
            return  # the consumer left before the request reached the engine
        try:
            self._engine.add_request(rid, list(request.prompt_token_ids), request.sampling)
        except (ValueError, TypeError) as exc:
            self._deliver(rid, InvalidRequest(f"the engine refused request {rid}: {exc}"))
            return
        except Exception as exc:  # noqa: BLE001 - reported to the request, the thread keeps serving
            self._deliver(rid, GenerationFailed(f"the engine failed to add request {rid}: {exc}"))
            return
        self._running.add(rid)

    def _abort_running(self, rid: str) -> None:
        if rid not in self._running:
            return
        self._running.discard(rid)
        self._engine_abort(rid)
        self._deliver(rid, TokenEvent((), "", FinishReason.ABORT))

    def _engine_abort(self, rid: str) -> None:
        try:
            self._engine.abort(rid)
        except Exception:  # noqa: BLE001, S110 - an abort of a request the engine already dropped
            pass

    def _step(self) -> None:
        try:
            outputs = self._engine.step()
        except Exception as exc:  # noqa: BLE001 - every running request learns of it, none hangs
            failed = list(self._running)
            self._running.clear()
            for rid in failed:
                self._engine_abort(rid)
                self._deliver(rid, GenerationFailed(f"engine step failed: {type(exc).__name__}: {exc}"))
            return
        for out in outputs:
            rid = out.request_id
            if rid not in self._running:
                continue
            finish = _finish_reason(out.finish_reason) if out.finished else None
            if finish is not None:
                self._running.discard(rid)
            event = TokenEvent(
                token_ids=tuple(out.new_token_ids),
                text=out.new_text or "",
                finish_reason=finish,
                prompt_tokens=int(out.num_prompt_tokens),
                completion_tokens=int(out.num_output_tokens),
            )
            self._deliver(rid, event)

    def _deliver(self, rid: str, item: _Item) -> None:
        with self._lock:
            stream = self._streams.get(rid)
        if stream is None:
            if not isinstance(item, BackendError) and item.finish_reason is None and rid in self._running:
                # Nobody reads this request any more: stop spending steps on it.
                self._running.discard(rid)
                self._engine_abort(rid)
            return
        self._post(stream, item)

    @staticmethod
    def _post(stream: _Stream, item: _Item) -> None:
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
        except RuntimeError:
            pass  # the consumer's event loop is closed; nobody is left to tell
