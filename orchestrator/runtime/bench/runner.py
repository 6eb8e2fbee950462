"""Send planned requests to an OpenAI endpoint at their times and record what happened.

Each request is a streamed ``POST /v1/completions`` with the prompt as token
ids, ``ignore_eos`` (so outputs have the trace's lengths on servers that
support it) and ``stream_options.include_usage``. TTFT is measured to the
first chunk carrying a choice, e2e to the end of the stream; the output
token count comes from the usage chunk (else the number of chunks). Every
request ends with exactly one ``RequestResult``: no request can hang past
``timeout_s``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

import httpx

from orchestrator.runtime.bench.workload import BenchRequest, WorkloadOptions, prompt_ids


class Outcome(str, Enum):
    """How one benchmark request ended."""

    OK = "ok"
    HTTP_ERROR = "http_error"  # a non-200 answer; ``status`` says which
    STREAM_ERROR = "stream_error"  # an error event in the stream, or a stream without an end
    TIMEOUT = "timeout"
    CONNECTION_ERROR = "connection_error"


@dataclass(frozen=True, slots=True)
class RequestResult:
    """What happened to one request; latencies are set only for ``OK``."""

    index: int
    scheduled_s: float
    sent_s: float
    outcome: Outcome
    status: int | None
    prompt_tokens: int
    max_tokens: int
    output_tokens: int = 0
    ttft_s: float | None = None
    e2e_s: float | None = None
    error: str = ""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where to send requests."""

    base_url: str
    model: str
    api_key: str | None = None
    timeout_s: float = 600.0
    ignore_eos: bool = True
    slo_class: str | None = None  # sent as x-pdserve-slo-class

    def headers(self) -> dict[str, str]:
        """Request headers: auth when a key is set, the SLO class when one is named."""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        if self.slo_class:
            headers["x-pdserve-slo-class"] = self.slo_class
        return headers


def _pending(request: BenchRequest, sent_s: float) -> RequestResult:
    """The result template of ``request``; each ending fills in its outcome."""
    return RequestResult(
        index=request.index, scheduled_s=request.send_at_s, sent_s=sent_s, outcome=Outcome.STREAM_ERROR,
        status=None, prompt_tokens=request.prompt_tokens, max_tokens=request.max_tokens,
    )


def _body(endpoint: Endpoint, request: BenchRequest, options: WorkloadOptions) -> dict[str, Any]:
    return {
        "model": endpoint.model,
        "prompt": prompt_ids(request, options),
        "max_tokens": request.max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": endpoint.ignore_eos,
    }


def _error_message(raw: bytes) -> str:
    try:
        payload = json.loads(raw)
        return str(payload["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return raw.decode(errors="replace")[:300]


async def _stream_one(
    client: httpx.AsyncClient, endpoint: Endpoint, request: BenchRequest, options: WorkloadOptions,
    run_start: float, sent: float,
) -> RequestResult:
    base = _pending(request, sent - run_start)
    url = endpoint.base_url.rstrip("/") + "/v1/completions"
    async with client.stream("POST", url, json=_body(endpoint, request, options), headers=endpoint.headers()) as resp:
        if resp.status_code != 200:
            raw = await resp.aread()
            return replace(base, outcome=Outcome.HTTP_ERROR, status=resp.status_code,
                                 error=_error_message(raw))
        first_s: float | None = None
        chunks = 0
        usage_tokens: int | None = None
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                end = time.perf_counter()
                if first_s is None:
                    return replace(base, outcome=Outcome.STREAM_ERROR, status=200,
                                         error="stream ended without tokens")
                return replace(
                    base, outcome=Outcome.OK, status=200,
                    output_tokens=usage_tokens if usage_tokens is not None else chunks,
                    ttft_s=first_s - sent, e2e_s=end - sent,
                )
            payload = json.loads(data)
            if "error" in payload:
                return replace(base, outcome=Outcome.STREAM_ERROR, status=200,
                                     error=str(payload["error"].get("message", payload["error"])))
            if payload.get("choices"):
                chunks += 1
                if first_s is None:
                    first_s = time.perf_counter()
            if payload.get("usage"):
                usage_tokens = int(payload["usage"]["completion_tokens"])
        return replace(base, outcome=Outcome.STREAM_ERROR, status=200, error="stream ended without [DONE]")


async def _one(
    client: httpx.AsyncClient, endpoint: Endpoint, request: BenchRequest, options: WorkloadOptions,
    run_start: float,
) -> RequestResult:
    delay_s = run_start + request.send_at_s - time.perf_counter()
    if delay_s > 0:
        await asyncio.sleep(delay_s)
    sent = time.perf_counter()
    base = _pending(request, sent - run_start)
    try:
        return await asyncio.wait_for(_stream_one(client, endpoint, request, options, run_start, sent),
                                      endpoint.timeout_s)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        return replace(base, outcome=Outcome.TIMEOUT, status=None,
                             error=f"no complete answer within {endpoint.timeout_s} s")
    except httpx.TransportError as exc:
        return replace(base, outcome=Outcome.CONNECTION_ERROR, status=None,
                             error=f"{type(exc).__name__}: {exc}")
    except (ValueError, KeyError, TypeError) as exc:
        return replace(base, outcome=Outcome.STREAM_ERROR, status=200,
                             error=f"unreadable stream: {type(exc).__name__}: {exc}")


async def run_requests(
    endpoint: Endpoint,
    requests: Sequence[BenchRequest],
    options: WorkloadOptions,
    on_result: Callable[[RequestResult], None] | None = None,
) -> list[RequestResult]:
    """Send every request at its time (concurrently) and return their results in index order."""
    timeout = httpx.Timeout(endpoint.timeout_s, connect=min(30.0, endpoint.timeout_s))
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        run_start = time.perf_counter()

        async def tracked(request: BenchRequest) -> RequestResult:
            result = await _one(client, endpoint, request, options, run_start)
            if on_result is not None:
                on_result(result)
            return result

        results = await asyncio.gather(*(tracked(r) for r in requests))
    return sorted(results, key=lambda r: r.index)


def discover_model(base_url: str, api_key: str | None, timeout_s: float = 30.0) -> tuple[str, int | None]:
    """The first model ``GET /v1/models`` lists and its context window (``max_model_len``) if given."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:  # refused, DNS, timeout, bad URL: the endpoint is unusable
        raise RuntimeError(f"cannot reach {base_url}: {exc or type(exc).__name__}") from None
    except httpx.InvalidURL as exc:
        raise RuntimeError(f"cannot reach {base_url}: invalid URL ({exc})") from None
    if resp.status_code != 200:
        raise RuntimeError(f"GET /v1/models answered {resp.status_code}: {_error_message(resp.content)}")
    data = resp.json().get("data") or []
    if not data:
        raise RuntimeError("GET /v1/models lists no model; pass --model")
    card = data[0]
    max_len = card.get("max_model_len")
    return str(card["id"]), int(max_len) if isinstance(max_len, int) else None
