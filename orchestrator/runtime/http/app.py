"""The OpenAI-compatible FastAPI app over any ``GenerationBackend``.

A generation request's life in the front end:

1. auth (``Authorization: Bearer``, every route but ``/health`` and ``/ready``), then the
   JSON body is parsed and validated (400 with the field on failure);
   A body over ``ServerLimits.max_body_bytes`` is answered 413 unread;
2. model check (404), tokenization / chat template in a worker thread (a
   long prompt must not stall other streams), context-window bounds
   (413, 400), deadline from ``x-pdserve-timeout-s`` or the default,
   front-end concurrency limit (429 + Retry-After);
3. ``backend.generate``: the first event is awaited before answering, so a
   rejection or failure before any token becomes a plain HTTP error;
4. tokens are streamed as SSE chunks or collected into one JSON response;
   an error after the first token becomes an SSE error event + ``[DONE]``;
5. a client that disconnects at any point has its request aborted in the
   backend; every request is counted once in ``pdserve_requests_total``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from orchestrator.core.clock import Clock
from orchestrator.runtime.backend import (
    BackendError,
    FinishReason,
    GenerationBackend,
    GenerationFailed,
    GenerationRequest,
    TokenEvent,
)
from orchestrator.runtime.http.config import DEFAULT_SLO_CLASS, PromptTokenizer, ServerLimits, WallClock
from orchestrator.runtime.http.errors import (
    APIError,
    bad_request,
    body_too_large,
    from_backend_error,
    from_validation_error,
    internal_error,
    rejected,
    route_error,
    unauthorized,
)
from orchestrator.runtime.http.prepare import build_request, check_model
from orchestrator.runtime.http.schemas import ChatCompletionRequest, CompletionRequest
from orchestrator.runtime.http.sse import (
    SSE_DONE,
    ResponseKind,
    ResponseMeta,
    full_response,
    sse_event,
    stream_chunk,
    usage_chunk,
)
from orchestrator.runtime.http.tracking import RequestTracker
from orchestrator.runtime.metrics import CONTENT_TYPE, ServingMetrics

API_KEY_ENV = "PDSERVE_API_KEY"
REQUEST_ID_HEADER = "x-request-id"
_T = TypeVar("_T")
_Body = TypeVar("_Body", bound=BaseModel)


@dataclass
class FrontEndState:
    """What the routes share; reachable as ``app.state.pdserve``."""

    backend: GenerationBackend
    tokenizer: PromptTokenizer
    model_name: str
    api_key: str | None
    metrics: ServingMetrics
    limits: ServerLimits
    clock: Clock
    in_flight: int = 0


class _ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class _SSEResponse(StreamingResponse):
    """A stream that watches for disconnects and always closes its body (which aborts the request)."""

    media_type = "text/event-stream"

    def __init__(self, body: AsyncIterator[bytes], headers: dict[str, str]) -> None:
        super().__init__(body, headers={**headers, "Cache-Control": "no-cache"})
        self._body = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:
                        pass  # the client went away mid-send; the body's cleanup aborts the request
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self._body, "aclose", None)
                if aclose is not None:
                    await aclose()


def _error_response(error: APIError, headers: dict[str, str]) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers={**headers, **error.headers})


async def _read_body(request: Request, max_bytes: int) -> bytes:
    """The body, or 413 as soon as it is known to exceed ``max_bytes`` (declared length or bytes so far)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise body_too_large(max_bytes)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():  # chunked bodies have no declared length
        size += len(chunk)
        if size > max_bytes:
            raise body_too_large(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_body(raw: bytes, schema: type[_Body]) -> _Body:
    # ValueError: bad syntax or UTF-8 (JSONDecodeError, UnicodeDecodeError) or an integer over Python's
    # 4300-digit limit; RecursionError: arrays or objects nested deeper than the parser's stack allows.
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise bad_request(f"malformed JSON body: {exc}", code="invalid_json") from exc
    if not isinstance(obj, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    try:
        return schema.model_validate(obj)
    except ValidationError as exc:
        raise from_validation_error(exc) from exc


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(
    request: Request, work: Awaitable[_T], on_gone: Callable[[], Awaitable[None]]
) -> _T:
    """``work``'s result; if the client leaves first: ``on_gone()``, cancel ``work``, raise ``_ClientGone``."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        # The server gave up on this request (its client left). ``work`` must have stopped before the
        # caller closes the stream it reads, or closing that stream fails ("already running").
        await _stop(task)
        raise
    finally:
        watch.cancel()
    if task.done():
        return task.result()
    await on_gone()  # first, so that the backend ends the stream even if ``work`` ignores one cancel
    await _stop(task)
    raise _ClientGone


async def _stop(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` until it has ended, even when the caller is being cancelled itself."""
    with anyio.CancelScope(shield=True):
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.5)
    if not task.cancelled():
        task.exception()  # mark a failure as seen; the client is gone either way


async def _next_event(stream: AsyncIterator[TokenEvent]) -> TokenEvent:
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        raise GenerationFailed("the backend ended the stream without a finish event") from None


async def _collect(stream: AsyncIterator[TokenEvent], tracker: RequestTracker) -> FinishReason:
    while True:
        event = await _next_event(stream)
        tracker.on_event(event)
        if event.finish_reason is not None:
            return event.finish_reason


async def _release(state: FrontEndState, stream: AsyncIterator[TokenEvent], request_id: str, finished: bool) -> None:
    """Abort an unfinished request, close its stream and free its front-end slot, even when cancelled."""
    with anyio.CancelScope(shield=True):
        try:
            if not finished:
                await state.backend.abort(request_id)
        finally:
            aclose = getattr(stream, "aclose", None)
            try:
                if aclose is not None:
                    await aclose()
            finally:
                state.in_flight -= 1
                state.metrics.set_running_requests("frontend", "http", state.in_flight)


async def _sse_body(
    state: FrontEndState,
    stream: AsyncIterator[TokenEvent],
    first: TokenEvent,
    tracker: RequestTracker,
    meta: ResponseMeta,
    include_usage: bool,
    request_id: str,
) -> AsyncIterator[bytes]:
    finished = False
    try:
        event, is_first = first, True
        while True:
            tracker.on_event(event)
            if event.text or event.finish_reason is not None or is_first:
                yield sse_event(stream_chunk(meta, event.text, event.finish_reason, is_first))
                is_first = False
            if event.finish_reason is not None:
                finished = True
                tracker.finish(event.finish_reason)
                break
            event = await _next_event(stream)
        if include_usage:
            yield sse_event(usage_chunk(meta, tracker.prompt_tokens, tracker.completion_tokens))
        yield SSE_DONE
    except Exception as exc:  # noqa: BLE001 - every failure is reported in-stream, then [DONE]
        error = from_backend_error(exc) if isinstance(exc, BackendError) else internal_error(exc)
        tracker.fail(error)
        yield sse_event(error.body())
        yield SSE_DONE
    finally:
        tracker.client_gone()  # no-op when the request already ended
        await _release(state, stream, request_id, finished)


async def _generate(
    state: FrontEndState, request: Request, schema: type[CompletionRequest] | type[ChatCompletionRequest]
) -> Response:
    arrival_s = state.clock.now_s()
    kind = ResponseKind.COMPLETION if schema is CompletionRequest else ResponseKind.CHAT
    prefix = "cmpl" if kind is ResponseKind.COMPLETION else "chatcmpl"
    # The backend id is always fresh, so two clients reusing an x-request-id cannot collide.
    request_id = f"{prefix}-{uuid.uuid4().hex}"
    headers = {REQUEST_ID_HEADER: request.headers.get(REQUEST_ID_HEADER) or request_id}
    # Labelled with the class only once it is known to be configured (bounded label sets).
    tracker = RequestTracker(state.metrics, state.clock, arrival_s, DEFAULT_SLO_CLASS)
    try:
        body = _parse_body(await _read_body(request, state.limits.max_body_bytes), schema)
        model_error = check_model(body.model, state.model_name)
        if model_error is not None:
            raise model_error
        greq = await asyncio.to_thread(
            build_request, body, request.headers, request_id, arrival_s, state.tokenizer, state.limits
        )
        tracker.slo_class = greq.slo_class
        limit = state.limits.max_concurrent_requests
        if limit is not None and state.in_flight >= limit:
            raise rejected("too_many_requests", state.limits.retry_after_s)
    except APIError as error:
        tracker.fail(error)
        return _error_response(error, headers)
    except ClientDisconnect:
        tracker.client_gone()
        return Response(status_code=499, headers=headers)
    except Exception as exc:  # noqa: BLE001 - e.g. a tokenizer failure; answered 500, counted, serving goes on
        unexpected = internal_error(exc)
        tracker.fail(unexpected)
        return _error_response(unexpected, headers)
    tracker.prompt_tokens = len(greq.prompt_token_ids)
    meta = ResponseMeta(request_id, int(state.clock.now_s()), state.model_name, kind)
    return await _run(state, request, greq, body, tracker, meta, headers)


async def _run(
    state: FrontEndState,
    request: Request,
    greq: GenerationRequest,
    body: CompletionRequest | ChatCompletionRequest,
    tracker: RequestTracker,
    meta: ResponseMeta,
    headers: dict[str, str],
) -> Response:
    state.in_flight += 1
    state.metrics.set_running_requests("frontend", "http", state.in_flight)
    stream = state.backend.generate(greq).__aiter__()
    handed_off = False
    finished = False

    async def abort() -> None:
        await state.backend.abort(greq.request_id)

    try:
        if body.stream:
            first = await _unless_disconnected(request, _next_event(stream), abort)
            handed_off = True
            sse = _sse_body(state, stream, first, tracker, meta, body.include_usage, greq.request_id)
            return _SSEResponse(sse, headers)
        reason = await _unless_disconnected(request, _collect(stream, tracker), abort)
        finished = True
        tracker.finish(reason)
        payload = full_response(meta, tracker.text, reason, tracker.prompt_tokens, tracker.completion_tokens)
        return JSONResponse(payload, headers=headers)
    except _ClientGone:
        tracker.client_gone()
        return Response(status_code=499, headers=headers)  # nobody reads it; the connection is gone
    except asyncio.CancelledError:  # the server cancelled the handler: its client is gone
        tracker.client_gone()
        raise
    except Exception as exc:  # noqa: BLE001 - mapped to an OpenAI error; the server keeps serving
        error = from_backend_error(exc) if isinstance(exc, BackendError) else internal_error(exc)
        tracker.fail(error)
        return _error_response(error, headers)
    finally:
        if not handed_off:
            await _release(state, stream, greq.request_id, finished)


def _auth_dependency(state: FrontEndState) -> Any:
    expected = state.api_key.encode() if state.api_key else None

    async def check(request: Request) -> None:
        if expected is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            raise unauthorized()

    return Depends(check)


def create_app(
    backend: GenerationBackend,
    tokenizer: PromptTokenizer,
    model_name: str,
    *,
    api_key: str | None = None,
    metrics: ServingMetrics | None = None,
    limits: ServerLimits | None = None,
    clock: Clock | None = None,
) -> FastAPI:
    """The OpenAI-compatible app; ``api_key=None`` reads ``PDSERVE_API_KEY`` (unset or empty: no auth)."""
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    state = FrontEndState(
        backend=backend,
        tokenizer=tokenizer,
        model_name=model_name,
        api_key=key or None,
        metrics=metrics if metrics is not None else ServingMetrics(),
        limits=limits if limits is not None else ServerLimits(),
        clock=clock if clock is not None else WallClock(),
    )
    app = FastAPI(title="pdserve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.pdserve = state
    auth = [_auth_dependency(state)]

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc, {})

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = 405 if exc.status_code == 405 else 404
        return _error_response(route_error(status, request.url.path, request.method), {})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return _error_response(internal_error(exc), {})

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request) -> Response:
        return await _generate(state, request, CompletionRequest)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request) -> Response:
        return await _generate(state, request, ChatCompletionRequest)

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict[str, Any]:
        created = int(state.clock.now_s())
        card = {
            "id": state.model_name, "object": "model", "created": created, "owned_by": "pdserve",
            "max_model_len": state.limits.max_context_tokens,
        }
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        # /health says the front end is up (liveness); this says whether a request could be served now
        # (readiness): a load balancer should send no traffic while every one would get a 503
        reason = state.backend.readiness()
        if reason is None:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)

    @app.get("/metrics", dependencies=auth)
    async def metrics_route() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    return app
