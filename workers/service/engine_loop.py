"""One thread owns the engine: commands and steps run there, outputs go to per-request sinks.

The engine is not thread-safe, so every call into it (add, abort, reserve,
KV writes, steps, load stats) runs on this thread. Other threads ``submit`` a
function and get a ``Future``; gRPC handlers ``attach`` a sink for a request
and receive its ``RequestOutput``s as they are produced. Between steps the loop
drains all pending commands first, so a layer's KV write always lands before
the command that joins its request to the batch. Once the loop stops (``stop``,
or a step raised), every command still queued and every later ``submit`` fails
with ``EngineStopped``, and every attached sink receives ``None``.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class OutputLike(Protocol):
    """What the loop needs from an engine output."""

    request_id: str
    finished: bool


Sink = Callable[[Any], None]  # receives each RequestOutput of one request


class EngineStopped(RuntimeError):
    """The engine loop no longer runs: this worker cannot serve the request, another worker may."""


class EngineLoop:
    """Runs ``engine.step()`` while there is work and commands in between, on one thread."""

    def __init__(self, engine: Any, name: str = "engine-loop", idle_wait_s: float = 0.05) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[tuple[Callable[[Any], Any], Future[Any]] | None] = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}
        self._idle_wait_s = idle_wait_s
        self._stopped = threading.Event()
        # held to check _stopped and queue a command, and to stop and take the last commands: none is
        # queued after the final drain, where it would never run nor fail (its caller waiting for good)
        self._gate = threading.Lock()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[Any], T]) -> Future[T]:
        """Run ``fn(engine)`` on the engine thread; the future holds its result or exception."""
        future: Future[T] = Future()
        with self._gate:
            if not self._stopped.is_set():
                self._commands.put((fn, future))
                return future
        future.set_exception(EngineStopped("engine loop is stopped"))
        return future

    def call(self, fn: Callable[[Any], T], timeout_s: float = 30.0) -> T:
        """``submit`` and wait for the result."""
        return self.submit(fn).result(timeout=timeout_s)

    def attach(self, request_id: str, sink: Sink) -> None:
        """Deliver ``request_id``'s outputs to ``sink`` (from the engine thread) until it finishes."""
        self._sinks[request_id] = sink

    def detach(self, request_id: str) -> None:
        """Stop delivering outputs of ``request_id``."""
        self._sinks.pop(request_id, None)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the loop after the current step."""
        self._stopped.set()
        self._commands.put(None)
        self._thread.join(timeout=timeout_s)

    def _has_work(self) -> bool:
        return bool(self.engine.has_unfinished())

    def _drain(self, block: bool) -> None:
        try:
            item = self._commands.get(timeout=self._idle_wait_s) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            fn, future = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(self.engine))
                except BaseException as exc:  # handed to the caller through the future
                    future.set_exception(exc)
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return

    def _run(self) -> None:
        try:
            while not self._stopped.is_set():
                self._drain(block=not self._has_work())
                if self._stopped.is_set() or not self._has_work():
                    continue
                for out in self.engine.step():
                    sink = self._sinks.get(out.request_id)
                    if out.finished:
                        self._sinks.pop(out.request_id, None)
                    if sink is not None:
                        sink(out)
        except BaseException as exc:  # the worker reports itself unhealthy rather than hanging streams
            log.exception("engine loop crashed")
            self.error = exc
            self._stopped.set()
        finally:
            self._fail_pending()

    def _fail_pending(self) -> None:
        items = []
        with self._gate:
            self._stopped.set()  # from here on, submit fails at once
            while True:
                try:
                    items.append(self._commands.get_nowait())
                except queue.Empty:
                    break
        for item in items:
            if item is not None and item[1].set_running_or_notify_cancel():
                item[1].set_exception(EngineStopped("engine loop stopped"))
        for sink in list(self._sinks.values()):
            sink(None)  # None tells a stream its engine is gone
        self._sinks.clear()

    @property
    def alive(self) -> bool:
        """Whether the loop thread is running."""
        return self._thread.is_alive() and not self._stopped.is_set()
