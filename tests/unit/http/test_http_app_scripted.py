"""The app over a scripted in-memory backend: error mapping before and during streams, aborts, usage."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import openai
import pytest

from orchestrator.runtime.backend import (
    BackendError,
    DeadlineExceeded,
    FinishReason,
    GenerationFailed,
    GenerationRequest,
    RequestRejected,
    TokenEvent,
)
from orchestrator.runtime.http import ServerLimits, create_app
from orchestrator.runtime.metrics import ServingMetrics

Script = Callable[[GenerationRequest], list[TokenEvent | BackendError | Exception]]


class ScriptedBackend:
    """Plays a fixed list of events or errors per request and records aborts."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[GenerationRequest] = []
        self.aborted: list[str] = []
        self.unready: str | None = None  # what readiness() says

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        self.requests.append(request)
        for item in self.script(request):
            await asyncio.sleep(0)
            if isinstance(item, BaseException):
                raise item
            yield item

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def readiness(self) -> str | None:
        return self.unready


class CharTokenizer:
    chat_template = None
    bos_token = None
    eos_token = None
    vocab_size = 0x110000  # every code point

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]


def _tokens(*texts: str, finish: FinishReason = FinishReason.STOP) -> list[TokenEvent | BackendError | Exception]:
    events: list[TokenEvent | BackendError | Exception] = []
    for i, text in enumerate(texts):
        last = i == len(texts) - 1
        events.append(TokenEvent((i,), text, finish if last else None, prompt_tokens=3, completion_tokens=i + 1))
    return events


def _fails_with(error: Exception) -> Script:
    return lambda request: [error]


def _call(backend: ScriptedBackend, body: dict, metrics: ServingMetrics | None = None) -> httpx.Response:
    app = create_app(backend, CharTokenizer(), "m", api_key="", metrics=metrics)

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/v1/completions", json={"model": "m", "prompt": "abc", **body})

    return asyncio.run(go())


def _events(resp: httpx.Response) -> list[str]:
    return [line[len("data: "):] for line in resp.text.split("\n\n") if line.startswith("data: ")]


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "m", "prompt": "abc", "seed": ' + b"9" * 4301 + b"}",  # over Python's int digit limit
        b'{"model": "m", "prompt": "abc", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # nested too deep
        b'{"model": "m", "prompt": ',
        b"\xff\xfe",
    ],
)
def test_a_body_that_is_not_json_python_can_read_is_400_invalid_json(raw: bytes) -> None:
    metrics = ServingMetrics()
    backend = ScriptedBackend(lambda r: _tokens("x"))
    app = create_app(backend, CharTokenizer(), "m", api_key="", metrics=metrics)

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})

    resp = asyncio.run(go())
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] == "invalid_json"
    assert backend.requests == []
    assert metrics.registry.get_sample_value(
        "pdserve_requests_total", {"outcome": "invalid", "reason": "invalid_json"}) == 1


def test_the_openai_client_sending_null_optional_fields_gets_the_defaults() -> None:
    backend = ScriptedBackend(lambda r: _tokens("a", "b"))
    app = create_app(backend, CharTokenizer(), "m", api_key="")

    async def go() -> list[str | None]:
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app))
        client = openai.AsyncOpenAI(base_url="http://t/v1", api_key="x", max_retries=0, http_client=http)
        messages: list[Any] = [{"role": "user", "content": "hi"}]
        async with client:
            chat = await client.chat.completions.create(
                model="m", messages=messages, temperature=None, top_p=None, n=None, stream=None, seed=None)
            completion = await client.completions.create(
                model="m", prompt="abc", temperature=None, echo=None, stream=None,
                extra_body={"top_k": None, "ignore_eos": None})
        return [chat.choices[0].message.content, completion.choices[0].text]

    assert asyncio.run(go()) == ["ab", "ab"]
    for request in backend.requests:
        assert (request.sampling.temperature, request.sampling.top_p, request.sampling.top_k) == (1.0, 1.0, 0)
        assert not request.sampling.ignore_eos


def test_whole_response_and_usage() -> None:
    backend = ScriptedBackend(lambda r: _tokens("Hel", "lo", finish=FinishReason.LENGTH))
    resp = _call(backend, {"max_tokens": 2})
    assert resp.status_code == 200
    body = resp.json()
    assert body["choices"][0]["text"] == "Hello" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert backend.requests[0].prompt_token_ids == (97, 98, 99)
    assert backend.aborted == []


def test_stream_ends_with_done_and_usage_chunk() -> None:
    backend = ScriptedBackend(lambda r: _tokens("a", "b", "c"))
    resp = _call(backend, {"stream": True, "stream_options": {"include_usage": True}})
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = _events(resp)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["text"] for c in chunks[:-1]] == ["a", "b", "c"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


def test_errors_before_the_first_token_are_plain_http_errors() -> None:
    cases = [
        (RequestRejected("overloaded", 4.5), 429, "5"),
        (GenerationFailed("no decode instance"), 503, None),
        (DeadlineExceeded("too slow"), 504, None),
        (RuntimeError("bug"), 500, None),
    ]
    for error, status, retry_after in cases:
        metrics = ServingMetrics()
        backend = ScriptedBackend(_fails_with(error))
        resp = _call(backend, {"stream": True}, metrics)
        assert resp.status_code == status
        assert resp.json()["error"]["message"]
        assert resp.headers.get("retry-after") == retry_after
        assert len(backend.aborted) == 1  # whatever happened, the backend is told to drop the request
        if status == 429:
            assert metrics.registry.get_sample_value(
                "pdserve_admission_rejections_total", {"reason": "overloaded"}) == 1


def test_error_mid_stream_is_an_sse_error_event_then_done() -> None:
    backend = ScriptedBackend(lambda r: [*_tokens("a", "b")[:1], GenerationFailed("decode worker died")])
    metrics = ServingMetrics()
    resp = _call(backend, {"stream": True}, metrics)
    assert resp.status_code == 200
    events = _events(resp)
    assert json.loads(events[0])["choices"][0]["text"] == "a"
    error = json.loads(events[1])["error"]
    assert error["code"] == "generation_failed" and "decode worker died" in error["message"]
    assert events[2:] == ["[DONE]"]
    assert backend.aborted == [backend.requests[0].request_id]
    assert metrics.registry.get_sample_value(
        "pdserve_requests_total", {"outcome": "error", "reason": "generation_failed"}) == 1


def test_stream_that_ends_without_finish_is_a_failure_not_a_hang() -> None:
    backend = ScriptedBackend(lambda r: _tokens("a", "b")[:1])
    resp = _call(backend, {})
    assert resp.status_code == 503
    assert "without a finish event" in resp.json()["error"]["message"]


def test_slo_class_and_timeout_headers_reach_the_backend() -> None:
    backend = ScriptedBackend(lambda r: _tokens("x"))
    app = create_app(backend, CharTokenizer(), "m", api_key="",
                     limits=ServerLimits(slo_classes=frozenset({"default", "batch"})))

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.post("/v1/completions", json={"model": "m", "prompt": "a"},
                                     headers={"x-pdserve-slo-class": "batch", "x-pdserve-timeout-s": "30"})

    assert asyncio.run(go()).status_code == 200
    req = backend.requests[0]
    assert req.slo_class == "batch"
    assert abs((req.deadline_s - req.arrival_s) - 30.0) < 1e-9


def test_unknown_slo_classes_are_400_and_add_no_metric_labels() -> None:
    backend = ScriptedBackend(lambda r: _tokens("x", "y"))
    metrics = ServingMetrics()
    app = create_app(backend, CharTokenizer(), "m", api_key="", metrics=metrics)

    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return [await client.post("/v1/completions", json={"model": "m", "prompt": "a"},
                                      headers={"x-pdserve-slo-class": f"tenant-{i}"}) for i in range(5)]

    for resp in asyncio.run(go()):
        assert resp.status_code == 400
        assert resp.json()["error"]["param"] == "x-pdserve-slo-class"
    assert backend.requests == []
    assert "tenant-" not in metrics.render().decode()


def test_api_key_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDSERVE_API_KEY", "from-env")
    app = create_app(ScriptedBackend(lambda r: _tokens("x")), CharTokenizer(), "m")

    async def go() -> list[int]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            body = {"model": "m", "prompt": "a"}
            return [
                (await client.post("/v1/completions", json=body)).status_code,
                (await client.post("/v1/completions", json=body,
                                   headers={"Authorization": "Bearer from-env"})).status_code,
                (await client.get("/health")).status_code,
            ]

    assert asyncio.run(go()) == [401, 200, 200]


def test_ready_follows_the_backend_while_health_stays_up() -> None:
    backend = ScriptedBackend(lambda r: _tokens("x"))
    app = create_app(backend, CharTokenizer(), "m", api_key="k")

    async def probe() -> list[tuple[int, dict[str, str]]]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            answers = []
            for path in ("/ready", "/health"):
                resp = await client.get(path)  # no key: probes need none
                answers.append((resp.status_code, resp.json()))
            return answers

    assert asyncio.run(probe()) == [(200, {"status": "ready"}), (200, {"status": "ok"})]
    backend.unready = "no healthy decode or colocated instance"
    assert asyncio.run(probe()) == [
        (503, {"status": "unavailable", "reason": "no healthy decode or colocated instance"}),
        (200, {"status": "ok"}),
    ]


class StuckInPrefill(ScriptedBackend):
    """A backend whose first token never comes (a long prefill); records when the request started."""

    def __init__(self) -> None:
        super().__init__(lambda r: [])
        self.started = asyncio.Event()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        self.requests.append(request)
        self.started.set()
        await asyncio.Event().wait()
        yield TokenEvent((), "", FinishReason.STOP)  # never reached


@pytest.mark.parametrize("stream", [False, True])
def test_a_handler_cancelled_during_prefill_ends_as_a_client_abort_not_a_500(stream: bool) -> None:
    metrics = ServingMetrics()
    backend = StuckInPrefill()
    app = create_app(backend, CharTokenizer(), "m", api_key="", metrics=metrics)
    body = json.dumps({"model": "m", "prompt": "abc", "stream": stream}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions", "root_path": "",
             "query_string": b"", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("test", 80)}
    sent: list[dict] = []

    async def go() -> None:
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict:
            if messages:
                return messages.pop(0)
            await asyncio.Event().wait()  # still connected, as far as the app can tell
            raise AssertionError("unreachable")

        async def send(message: dict) -> None:
            sent.append(message)

        task = asyncio.create_task(app(scope, receive, send))
        await backend.started.wait()
        task.cancel()  # what the server does with the handler of a client that went away
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    assert sent == []  # no 500 (or any answer) to a client that is gone
    assert backend.aborted == [backend.requests[0].request_id]
    assert metrics.registry.get_sample_value(
        "pdserve_requests_total", {"outcome": "abort", "reason": "client_disconnected"}) == 1
    assert metrics.registry.get_sample_value("pdserve_running_requests", {"instance": "frontend", "role": "http"}) == 0
