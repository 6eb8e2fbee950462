"""The router's brain: a ``GenerationBackend`` over prefill and decode workers.

A request's life here (DESIGN.md, disaggregated path):
1. admission on the latest snapshot (core ``admit``): reject (429), wait at
   the router while every entry instance is over its limit, or go on;
2. core ``route`` picks P and D (or D alone for short prompts) and the
   decision is booked into the local snapshot (``apply_route``) until the
   controller publishes a fresher one;
3. D reserves KV and returns a transfer descriptor; P prefills with it,
   pushing KV layer by layer, and returns token 1 (streamed at once);
4. D joins the request to its batch when the last layer landed and streams
   the rest.
Failures never hang a stream: a dead or unreachable P retries the prefill on
another P (then recomputes on D); a failed transfer retries it away from the
side P names in the call's trailing metadata (P for corrupt bytes, D when
the receiver refused or vanished, neither when it cannot be told; see
``workers.kv.errors.sending_side_fault``); a dead D mid-stream
resumes prompt + tokens so far on another D (greedy decoding continues with
the same tokens); with nothing left the stream ends in ``GenerationFailed``.
Every wait is bounded by the request's deadline. Text is detokenized here over
the whole token stream, so it stays consistent across those hand-overs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import grpc

from orchestrator.core.admission import AdmissionConfig, AdmissionOutcome, admit
from orchestrator.core.routing import (
    NoRoute,
    RouteDecision,
    RouteMode,
    RoutingConfig,
    apply_route,
    route,
    serving_gap,
)
from orchestrator.core.types import ClusterSnapshot, InstanceHealth, RequestInfo
from orchestrator.runtime.backend import (
    DeadlineExceeded,
    FinishReason,
    GenerationFailed,
    GenerationRequest,
    InvalidRequest,
    RequestRejected,
    TokenEvent,
)
from orchestrator.runtime.controller import ClusterView
from orchestrator.runtime.metrics import ServingMetrics
from orchestrator.runtime.worker_client import (
    TransferFailed,
    WorkerBusy,
    WorkerCallError,
    WorkerClient,
    WorkerRejected,
    WorkerUnavailable,
)
from workers.engine.detokenizer import Decoder, IncrementalDetokenizer
from workers.kv.errors import TransferFault
from workers.service.types import GenerateMode, StreamFinish, TokenChunk

log = logging.getLogger(__name__)

_FINISH = {StreamFinish.STOP: FinishReason.STOP, StreamFinish.LENGTH: FinishReason.LENGTH,
           StreamFinish.ABORT: FinishReason.ABORT}


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """Knobs of the disaggregated backend."""

    routing: RoutingConfig = field(default_factory=RoutingConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    refresh_interval_s: float = 0.2  # how often the controller's view is fetched
    max_attempts: int = 4  # prefill or decode hand-overs per request before giving up
    suspect_s: float = 5.0  # a worker that failed a call gets no new requests for this long (or a newer view)
    queue_poll_s: float = 0.02  # how often a request waiting at the router re-checks admission
    transfer_timeout_s: float = 10.0  # wait for the last KV layer once prefill has returned
    busy_retry_s: float = 0.05  # wait before routing again when no decode worker had KV room


class ViewSource(Protocol):
    """Where a router gets the controller's views."""

    async def fetch(self, newer_than: int) -> ClusterView | None:
        """The latest view if its version is above ``newer_than``, else None."""
        ...


class ControllerViews:
    """Views from the controller actor (a Ray actor handle)."""

    def __init__(self, controller: Any) -> None:
        self.controller = controller

    async def fetch(self, newer_than: int) -> ClusterView | None:
        """Ask the controller actor."""
        view: ClusterView | None = await self.controller.get_view.remote(newer_than)
        return view


class StaticViews:
    """An in-memory view source: serves whatever view was last ``publish``ed (tests, simulations)."""

    def __init__(self, view: ClusterView) -> None:
        self.view = view

    def publish(self, view: ClusterView) -> None:
        """Make ``view`` the current one."""
        self.view = view

    async def fetch(self, newer_than: int) -> ClusterView | None:
        """The current view if newer."""
        return self.view if self.view.snapshot.version > newer_than else None


def warm_up(snapshot: ClusterSnapshot, routing: RoutingConfig, admission: AdmissionConfig) -> None:
    """Build the snapshot's memoized routing and admission structures now, off the request path."""
    probe = RequestInfo("warm-up", prompt_tokens=routing.short_prompt_tokens + 1, max_output_tokens=1, arrival_s=0.0)
    admit(snapshot, probe, admission)
    route(snapshot, probe, routing)


class _Attempt(Exception):
    """A hand-over is needed; ``suspect`` names the worker to avoid next."""

    def __init__(self, cause: WorkerCallError, suspect: str | None, busy: bool = False) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.suspect = suspect
        self.busy = busy  # no room right now: wait and route again (bounded by the deadline)


class DisaggregatedBackend:
    """Routes requests over the controller's view to prefill/decode workers via gRPC."""

    def __init__(self, views: ViewSource, decoder: Decoder | None, config: RouterConfig | None = None,
                 initial_view: ClusterView | None = None, metrics: ServingMetrics | None = None) -> None:
        self.views = views
        self.metrics = metrics
        self.decoder = decoder
        self.config = config or RouterConfig()
        self._view = initial_view or ClusterView(ClusterSnapshot(at_s=0.0), ())
        self._snapshot = self._view.snapshot
        self._suspects: dict[str, float] = {}  # instance id -> until (monotonic s)
        self._clients: dict[str, WorkerClient] = {}
        self._active: dict[str, set[str]] = {}  # request id -> instance ids it runs on
        self._aborted: set[str] = set()  # requests in flight that ``abort`` was called for
        self._queued = 0
        self._shown: set[tuple[str, str]] = set()  # (instance id, role) series the metrics show
        self._refresher: asyncio.Task[None] | None = None
        self.handovers = 0  # prefill retries + decode resumes, for tests and metrics
        self.busy_retries = 0  # waits because no decode worker had KV room

    # --- the controller's view ----------------------------------------------------------------
    @property
    def view(self) -> ClusterView:
        """The latest view from the controller."""
        return self._view

    def _ensure_refresher(self) -> None:
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.create_task(self._refresh_forever())

    async def _refresh_forever(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.config.refresh_interval_s)

    async def refresh(self) -> bool:
        """Fetch a newer view; on any failure keep serving from the last one. Whether it changed."""
        try:
            view = await asyncio.wait_for(
                self.views.fetch(self._view.snapshot.version), timeout=max(1.0, 5 * self.config.refresh_interval_s)
            )
        except Exception as exc:  # controller restarting or unreachable: routers go on with what they have
            log.debug("view refresh failed: %s", exc)
            return False
        if view is None or view.snapshot.version <= self._view.snapshot.version:
            return False
        warm_up(view.snapshot, self.config.routing, self.config.admission)
        self._record_view(view)
        self._view = view
        self._snapshot = view.snapshot
        now = time.monotonic()
        self._suspects = {k: v for k, v in self._suspects.items() if v > now}
        return True

    def _record_view(self, view: ClusterView) -> None:
        if self.metrics is None:
            return
        shown: set[tuple[str, str]] = set()
        for inst in view.snapshot.instances:
            role = inst.role.value
            shown.add((inst.instance_id, role))
            self.metrics.set_running_requests(inst.instance_id, role, inst.running_requests)
            self.metrics.set_kv_blocks(inst.instance_id, role, inst.total_kv_blocks - inst.free_kv_blocks,
                                       inst.free_kv_blocks)
            self.metrics.set_queue_depth(role, inst.instance_id, inst.waiting_requests)
        # Instances that left the view (or flipped role) must not keep reporting their last values.
        for instance_id, role in self._shown - shown:
            self.metrics.forget_instance(instance_id, role)
        self._shown = shown

    def _routable_snapshot(self) -> ClusterSnapshot:
        now = time.monotonic()
        if not any(until > now for until in self._suspects.values()):
            return self._snapshot
        snap = self._snapshot
        marked = {}
        for iid, until in self._suspects.items():
            pos = snap.position(iid)
            if until > now and pos is not None:
                marked[pos] = replace(snap.instances[pos], health=InstanceHealth.UNHEALTHY)
        return snap.with_replaced(marked) if marked else snap

    def _suspect(self, instance_id: str | None) -> None:
        if instance_id is not None:
            self._suspects[instance_id] = time.monotonic() + self.config.suspect_s

    def _client(self, instance_id: str) -> WorkerClient:
        ep = self._view.endpoint(instance_id)
        if ep is None:
            raise WorkerUnavailable(instance_id, "connect", None, "not in the controller's view")
        client = self._clients.get(ep.grpc_address)
        if client is None:
            client = self._clients[ep.grpc_address] = WorkerClient(ep.grpc_address)
        return client

    # --- admission and routing ----------------------------------------------------------------------
    async def _admit(self, info: RequestInfo, deadline_s: float) -> None:
        queued = False
        try:
            while True:
                decision = admit(self._routable_snapshot(), info, self.config.admission, self._queued)
                if decision.outcome is AdmissionOutcome.ADMIT:
                    return
                if decision.outcome is AdmissionOutcome.REJECT:
                    reason = decision.reason.value if decision.reason else "rejected"
                    raise RequestRejected(reason, decision.retry_after_s)
                if not queued:
                    queued = True
                    self._queued += 1
                    self._record_router_queue()
                if time.time() >= deadline_s:
                    raise DeadlineExceeded(f"request {info.request_id} waited at the router past its deadline")
                await asyncio.sleep(self.config.queue_poll_s)
        finally:
            if queued:  # admitted, rejected, timed out or cancelled: it left the queue either way
                self._queued -= 1
                self._record_router_queue()

    def _record_router_queue(self) -> None:
        if self.metrics is not None:
            self.metrics.set_queue_depth("router", "router", self._queued)

    def _route(self, info: RequestInfo, first_attempt: bool) -> RouteDecision:
        snap = self._routable_snapshot()
        decision = route(snap, info, self.config.routing)
        if isinstance(decision, NoRoute) and first_attempt and snap is not self._snapshot:
            # Every candidate failed a call recently; a new request still tries them (the failure may
            # have been transient), while a request that is failing over does not go back.
            snap = self._snapshot
            decision = route(snap, info, self.config.routing)
        if isinstance(decision, NoRoute):
            raise GenerationFailed(f"request {info.request_id}: {decision.reason}")
        # Book the decision so a burst between two views spreads over the instances.
        if snap is self._snapshot:
            self._snapshot = apply_route(snap, info, decision)
        return decision

    # --- GenerationBackend ------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Stream ``request``'s tokens through prefill and decode workers, failing over as needed."""
        self._ensure_refresher()
        rid = request.request_id
        self._remaining_s(request)  # nothing starts for a request already past its deadline
        info = RequestInfo(rid, len(request.prompt_token_ids), request.sampling.max_tokens, request.arrival_s,
                           request.slo_class)
        self._active[rid] = set()  # from here on ``abort`` knows the request, while it queues too
        detok = IncrementalDetokenizer(self.decoder, request.sampling.stop, request.prompt_token_ids)
        generated: list[int] = []
        worker_finished = False  # the worker ended the request itself: nothing to abort
        try:
            await self._admit(info, request.deadline_s)
            attempts = 0
            while True:
                try:
                    attempt_stream = self._one_attempt(request, info, tuple(generated), attempts == 0)
                    async with aclosing(attempt_stream) as chunks:
                        async for chunk in chunks:
                            for tok in chunk.token_ids:
                                generated.append(tok)
                                detok.add(tok)
                            worker_finished = chunk.finish is not None
                            finish = _FINISH[chunk.finish] if chunk.finish is not None else None
                            if detok.stopped:  # a stop string completed: end here, abort the worker
                                finish = FinishReason.STOP
                            yield TokenEvent(chunk.token_ids, detok.delta(finish is not None), finish,
                                             prompt_tokens=info.prompt_tokens, completion_tokens=len(generated))
                            if finish is not None:
                                return
                    raise _Attempt(WorkerUnavailable("decode", "Generate", None, "stream ended early"), None)
                except _Attempt as attempt:
                    if rid in self._aborted:
                        # The failure is most likely the abort itself (a reservation or prefill dropped
                        # under the request): it must not start over on other workers.
                        yield TokenEvent((), detok.delta(True), FinishReason.ABORT,
                                         prompt_tokens=info.prompt_tokens, completion_tokens=len(generated))
                        return
                    if time.time() >= request.deadline_s:
                        raise DeadlineExceeded(f"request {rid} passed its deadline ({attempt.cause})") from None
                    if attempt.busy:  # back-pressure, not a failure
                        self.busy_retries += 1
                        await asyncio.sleep(self.config.busy_retry_s)
                        await self.refresh()
                        continue
                    attempts += 1
                    self.handovers += 1
                    self._suspect(attempt.suspect)
                    if attempts >= self.config.max_attempts:
                        raise GenerationFailed(
                            f"request {rid} failed after {attempts} attempts: {attempt.cause}"
                        ) from None
                    log.warning("request %s: handing over after %s", rid, attempt.cause)
                    await self.refresh()
        finally:
            instances = self._active.pop(rid, set())
            self._aborted.discard(rid)
            if not worker_finished:
                await self._abort_on(rid, instances)

    def _remaining_s(self, request: GenerationRequest) -> float:
        remaining = request.deadline_s - time.time()
        if remaining <= 0:
            raise DeadlineExceeded(f"request {request.request_id} passed its deadline")
        return remaining

    async def _one_attempt(self, request: GenerationRequest, info: RequestInfo, generated: tuple[int, ...],
                           first_attempt: bool) -> AsyncGenerator[TokenChunk, None]:
        """One try at producing the rest of the tokens; raises ``_Attempt`` to hand over."""
        self._stop_if_aborted(request.request_id)
        decision = self._route(info, first_attempt and not generated)
        rid, prompt, sampling = request.request_id, request.prompt_token_ids, request.sampling
        d_id = decision.decode_instance_id
        self._active[rid].add(d_id)
        if generated:  # failover: D recomputes prompt + tokens so far
            stream = self._client(d_id).resume(rid, prompt, generated, sampling, self._remaining_s(request))
        elif decision.mode is RouteMode.DISAGGREGATED and decision.prefill_instance_id is not None:
            first = await self._prefill(request, decision.prefill_instance_id, d_id)
            yield first
            self._stop_if_aborted(rid)  # aborted while the client read the first token
            stream = self._client(d_id).generate(rid, prompt, sampling, GenerateMode.AFTER_TRANSFER,
                                                 first.token_ids[0], self._remaining_s(request),
                                                 self.config.transfer_timeout_s)
            try:
                async for chunk in stream:
                    yield chunk
                return
            except TransferFailed as exc:
                # The KV did not land; D recomputes from the prompt and the first token.
                raise _Attempt(exc, None) from None
            except WorkerRejected as exc:
                if exc.code is grpc.StatusCode.NOT_FOUND:  # the reservation is gone: recompute as well
                    raise _Attempt(exc, None) from None
                raise self._handover(exc, d_id, request) from None
            except WorkerCallError as exc:
                raise self._handover(exc, d_id, request) from None
        else:
            stream = self._client(d_id).generate(rid, prompt, sampling, GenerateMode.LOCAL_PREFILL, None,
                                                 self._remaining_s(request))
        try:
            async for chunk in stream:
                yield chunk
        except WorkerCallError as exc:
            raise self._handover(exc, d_id, request) from None

    def _stop_if_aborted(self, request_id: str) -> None:
        """Raise ``_Attempt`` for a request ``abort`` was called for: ``generate`` then ends it as ABORT.

        An abort that comes while a call is in flight finds nothing to stop on a worker that has not
        taken the request yet (a reservation being made); this check keeps the request from going on.
        """
        if request_id in self._aborted:
            raise _Attempt(WorkerUnavailable("router", "abort", None, "aborted"), None)

    @staticmethod
    def _prefill_suspect(exc: WorkerCallError, p_id: str, d_id: str) -> str | None:
        """The worker to avoid after P's prefill call failed: P itself, unless its KV transfer did."""
        if not isinstance(exc, TransferFailed):
            return p_id
        fault = exc.fault
        if fault is TransferFault.SENDER:
            return p_id
        # The receiver vanished or refused: the transfer's target D, so the retry reserves elsewhere.
        return d_id if fault is TransferFault.RECEIVER else None

    def _handover(self, exc: WorkerCallError, instance_id: str | None, request: GenerationRequest) -> BaseException:
        if time.time() >= request.deadline_s:
            return DeadlineExceeded(f"request {request.request_id} passed its deadline: {exc}")
        if isinstance(exc, WorkerBusy):
            return _Attempt(exc, None, busy=True)
        if isinstance(exc, WorkerRejected):
            if exc.code is grpc.StatusCode.INVALID_ARGUMENT:  # bad input (e.g. a token id): a 400, not a 503
                return InvalidRequest(f"request {request.request_id}: {exc.detail}")
            return GenerationFailed(f"request {request.request_id}: {exc}")
        return _Attempt(exc, instance_id)

    async def _prefill(self, request: GenerationRequest, p_id: str, d_id: str) -> TokenChunk:
        rid = request.request_id
        d = self._client(d_id)
        try:
            # The reservation must outlive P's prefill queue, which under load can exceed the
            # transfer timeout; it lasts as long as the request may. Every failure path below
            # aborts it explicitly, so the worker's reaper only matters if this router dies.
            res = await d.reserve(rid, request.prompt_token_ids, self._remaining_s(request),
                                  request.sampling.max_tokens)
        except WorkerCallError as exc:
            raise self._handover(exc, d_id, request) from None
        self._active[rid].add(p_id)
        self._stop_if_aborted(rid)  # aborted while the reservation was made: D's abort found nothing then
        try:
            result = await self._client(p_id).prefill(rid, request.prompt_token_ids, request.sampling,
                                                      res.descriptor, self._remaining_s(request))
        except (WorkerCallError, DeadlineExceeded) as exc:
            if isinstance(exc, TransferFailed) and self.metrics is not None:
                self.metrics.record_kv_transfer_failure(res.descriptor.kind.value, "transfer_error")
            await d.abort(rid)  # give the reservation back before trying elsewhere
            if isinstance(exc, DeadlineExceeded):
                raise
            raise self._handover(exc, self._prefill_suspect(exc, p_id, d_id), request) from None
        if result.transfer is not None and self.metrics is not None:
            self.metrics.record_kv_transfer(result.transfer.kind.value, result.transfer.num_bytes,
                                            result.transfer.seconds)
        # No finish here, even at max_tokens 1: D says whether the first token ends the request (EOS, a
        # stop token, the length), by the engine's own rules, and frees the reservation as it does.
        return TokenChunk((result.first_token_id,), "", None, len(request.prompt_token_ids), 1)

    async def _abort_on(self, request_id: str, instance_ids: set[str]) -> None:
        for iid in instance_ids:
            try:
                await self._client(iid).abort(request_id)
            except WorkerCallError:
                pass

    def active_requests(self) -> dict[str, frozenset[str]]:
        """Every request in flight here and the instance ids it has run on so far."""
        return {rid: frozenset(ids) for rid, ids in self._active.items()}

    def instances_of(self, request_id: str) -> frozenset[str]:
        """Instance ids ``request_id`` has run on so far (empty once it ended)."""
        return frozenset(self._active.get(request_id, ()))

    def readiness(self) -> str | None:
        """Why no request could be served now, by the router's current view (suspects excluded); None when one could."""
        return serving_gap(self._routable_snapshot())

    async def abort(self, request_id: str) -> None:
        """Stop ``request_id`` on every worker it touched; it is not handed over to other workers afterwards."""
        if request_id in self._active:
            self._aborted.add(request_id)
        await self._abort_on(request_id, self._active.get(request_id, set()))

    async def close(self) -> None:
        """Stop refreshing and close every channel."""
        if self._refresher is not None:
            self._refresher.cancel()
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
