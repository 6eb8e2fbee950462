"""The prefill worker: runs prompts one at a time, pushing each layer's KV to the decode worker.

A request here: queued (counted in ``queued_prefill_tokens``) -> prefilled on
the engine thread, where the engine's per-layer hook hands K/V to a sender
opened from the decode worker's descriptor (the sender puts it on the wire in
the background, overlapped with the next layer's compute) -> ``finish`` waits
for the receiver's verdict -> the first token goes back to the router. An
aborted request still queued is skipped; a failed transfer aborts the sender
so the receiver sees the error too. While a Prefill call for a request id is in
progress, another with that id is refused with ``DuplicateRequest``.

A load report (the controller's health probe) never waits for the engine
thread, which may be busy with prefills for seconds: it is the engine's
counters as the engine thread last recorded them (at start and after each
prefill) plus the prompts queued here, counted by this worker.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, replace
from typing import Any

from orchestrator.core.types import InstanceLoad, Role
from workers.engine.outputs import DuplicateRequest, InvalidRequest
from workers.engine.sampling_params import SamplingParams
from workers.kv.descriptor import TransferDescriptor
from workers.kv.interface import KVSender
from workers.kv.registry import KVClient
from workers.service.abandon import outlive_caller
from workers.service.decode import WorkerError, engine_load
from workers.service.engine_loop import EngineLoop, EngineStopped
from workers.service.types import PrefillResult


class PrefillAborted(WorkerError):
    """The request was aborted before its prefill ran."""


@dataclass
class _Job:
    """One Prefill call; its own record, so an abort or a departing caller never touches another call's."""

    num_tokens: int
    started: bool = False
    aborted: bool = False


class PrefillWorker:
    """Plain prefill worker over an engine loop and a KV client (no gRPC, no Ray)."""

    def __init__(self, loop: EngineLoop, kv_client: KVClient, instance_id: str, node_id: str = "node-0") -> None:
        self.loop = loop
        self.kv_client = kv_client
        self.instance_id = instance_id
        self.node_id = node_id
        self._lock = threading.Lock()
        # Prompts whose job has not started on the engine thread: a report's queued work beyond the engine's.
        self._queued_tokens = 0
        self._queued_jobs = 0
        self._jobs: dict[str, _Job] = {}  # request id -> its Prefill call in progress (queued or running)
        self._engine_load = loop.call(self._engine_counters)  # replaced whole under _lock: never read torn

    def _engine_counters(self, engine: Any) -> InstanceLoad:
        """The engine's own load counters (call on the engine thread)."""
        return engine_load(engine, self.instance_id, Role.PREFILL, self.node_id)

    def _record_engine_load(self, engine: Any) -> None:
        """Record the engine's counters for ``load`` (call on the engine thread, after a job changed them)."""
        counters = self._engine_counters(engine)
        with self._lock:
            self._engine_load = counters

    def _run(
        self,
        engine: Any,
        job: _Job,
        request_id: str,
        prompt: list[int],
        sampling: SamplingParams,
        descriptor: TransferDescriptor,
    ) -> tuple[int, KVSender]:
        with self._lock:
            self._queued_tokens -= job.num_tokens
            self._queued_jobs -= 1
            job.started = True
            if job.aborted:
                raise PrefillAborted(f"request {request_id!r} was aborted before its prefill")
        sender = self.kv_client.open(descriptor)
        try:
            first = engine.prefill(request_id, prompt, sampling, on_layer_kv=sender.send_layer)
        except BaseException:
            sender.abort()
            raise
        finally:
            self._record_engine_load(engine)
        return int(first), sender

    async def prefill(
        self,
        request_id: str,
        prompt_token_ids: tuple[int, ...],
        sampling: SamplingParams,
        descriptor: TransferDescriptor,
    ) -> PrefillResult:
        """Prefill ``prompt_token_ids``, pushing KV to ``descriptor``; returns the first token."""
        if not prompt_token_ids:
            raise InvalidRequest("prompt_token_ids must not be empty")
        prompt = list(prompt_token_ids)
        job = _Job(len(prompt))
        with self._lock:
            if request_id in self._jobs:
                raise DuplicateRequest(f"request {request_id!r} is already in prefill on {self.instance_id}")
            self._jobs[request_id] = job
            self._queued_tokens += job.num_tokens
            self._queued_jobs += 1
        try:
            return await self._prefill(job, request_id, prompt, sampling, descriptor)
        finally:
            with self._lock:
                del self._jobs[request_id]

    async def _prefill(
        self,
        job: _Job,
        request_id: str,
        prompt: list[int],
        sampling: SamplingParams,
        descriptor: TransferDescriptor,
    ) -> PrefillResult:
        work = self.loop.submit(lambda e: self._run(e, job, request_id, prompt, sampling, descriptor))
        try:
            # not cancelled with the call: a job that never ran would leave its tokens counted as queued
            first, sender = await outlive_caller(work, lambda done: self._abort_sender(done[1]))
        except asyncio.CancelledError:  # the caller left (a client disconnect)
            with self._lock:  # skipped if it has not started; its sender aborted once it returns if it has
                job.aborted = True
            raise
        # Waiting for the receiver's verdict happens off the engine thread: the next prompt can run.
        try:
            stats = await asyncio.to_thread(sender.finish)
        except BaseException:
            sender.abort()
            raise
        return PrefillResult(first_token_id=first, first_text="", transfer=stats)

    @staticmethod
    def _abort_sender(sender: KVSender) -> None:
        """Abort an abandoned prefill's sender off the engine thread, which completes the job: abort() waits for the sending thread."""
        threading.Thread(target=sender.abort, name="kv-abort-abandoned", daemon=True).start()

    def abort(self, request_id: str) -> bool:
        """Skip ``request_id`` if its prefill has not started yet."""
        with self._lock:
            job = self._jobs.get(request_id)
            if job is None or job.started:
                return False
            job.aborted = True
        return True

    def load(self) -> InstanceLoad:
        """Current load report, never waiting for the engine thread (queued prompts count as waiting requests)."""
        if not self.loop.alive:  # a stale report would pass the health probe of a worker that serves nothing
            raise EngineStopped(f"engine of {self.instance_id} stopped")
        with self._lock:
            counters, tokens, jobs = self._engine_load, self._queued_tokens, self._queued_jobs
        return replace(
            counters,
            queued_prefill_tokens=counters.queued_prefill_tokens + tokens,
            waiting_requests=counters.waiting_requests + jobs,
        )

    @property
    def healthy(self) -> bool:
        """Whether the engine loop still runs."""
        return self.loop.alive

    def close(self) -> None:
        """Release connections and stop the engine loop."""
        self.kv_client.close()
        self.loop.stop()
