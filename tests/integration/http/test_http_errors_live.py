"""Bad input, auth, limits and deadlines against a real server: the right OpenAI error, then service goes on."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from http_live_support import MODEL, LiveServer

from orchestrator.commands.up import curl_hint
from orchestrator.runtime.http import ServerHandle, ServerLimits, create_app, serve


def _post(url: str, body: object, headers: dict[str, str] | None = None, raw: bytes | None = None) -> httpx.Response:
    if raw is not None:
        return httpx.post(url, content=raw, headers={"content-type": "application/json", **(headers or {})},
                          timeout=30)
    return httpx.post(url, json=body, headers=headers, timeout=30)


def _assert_error(resp: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


def _still_serves(live: LiveServer) -> None:
    resp = _post(live.url + "/v1/completions", {"model": MODEL, "prompt": "still there?", "max_tokens": 2})
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] >= 1


BAD_BODIES = [
    # (body, status, param, code)
    ({"model": "gpt-17", "prompt": "x"}, 404, "model", "model_not_found"),
    ({"model": MODEL, "prompt": [5] * 2100}, 413, "prompt", "context_length_exceeded"),
    ({"model": MODEL, "prompt": "x", "max_tokens": -1}, 400, "max_tokens", None),
    ({"model": MODEL, "prompt": "x", "max_tokens": 100000}, 400, "max_tokens", "context_length_exceeded"),
    ({"model": MODEL, "prompt": "x", "n": 2}, 400, "n", None),
    ({"model": MODEL, "prompt": "x", "temperature": 5}, 400, "temperature", None),
    ({"model": MODEL, "prompt": "x", "temperature": "hot"}, 400, "temperature", None),
    ({"model": MODEL, "prompt": [10**9]}, 400, "prompt", "invalid_token_id"),  # token id outside the vocabulary
    ({"model": MODEL, "prompt": [1, 32000]}, 400, "prompt", "invalid_token_id"),  # the tiny model has 32000
    ({"prompt": "x"}, 400, "model", None),
    ({"model": MODEL, "prompt": "x", "seed": 2**64}, 400, "seed", None),  # beyond int64: not a 500
    ({"model": MODEL, "prompt": "x", "best_of": 3}, 400, "best_of", None),
    ({"model": MODEL, "prompt": "x", "presence_penalty": 1.5}, 400, "presence_penalty", None),
    ({"model": MODEL, "prompt": "x", "logit_bias": {"50256": -100}}, 400, "logit_bias", None),
    ({"model": MODEL, "prompt": "x", "echo": True}, 400, "echo", None),
    ([1, 2], 400, None, "invalid_json"),
]


@pytest.mark.parametrize(("body", "status", "param", "code"), BAD_BODIES)
def test_bad_completion_input(live: LiveServer, body: object, status: int, param: str | None, code: str | None) -> None:
    _assert_error(_post(live.url + "/v1/completions", body), status, param, code)
    _still_serves(live)


def test_malformed_json_and_bad_chat_input(live: LiveServer) -> None:
    _assert_error(_post(live.url + "/v1/completions", None, raw=b'{"model": "tiny-llama", "prompt": '), 400,
                  code="invalid_json")
    _assert_error(_post(live.url + "/v1/chat/completions", None, raw=b"\xff\xfe"), 400, code="invalid_json")
    chat = live.url + "/v1/chat/completions"
    _assert_error(_post(chat, {"model": MODEL, "messages": []}), 400, "messages")
    _assert_error(_post(chat, {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 3}), 400, "n")
    _assert_error(_post(chat, {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                               "response_format": {"type": "json_object"}}), 400, "response_format")
    _assert_error(_post(chat, {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                               "frequency_penalty": 0.3}), 400, "frequency_penalty")
    _assert_error(_post(chat, {"model": MODEL, "messages": [{"role": "user", "content": "x " * 2100}]}), 413)
    _still_serves(live)


def test_bodies_the_parser_or_tokenizer_cannot_take_are_400_not_500(live: LiveServer) -> None:
    completions, chat = live.url + "/v1/completions", live.url + "/v1/chat/completions"
    digits = b'{"model": "tiny-llama", "prompt": "x", "max_tokens": 2, "seed": ' + b"9" * 4301 + b"}"
    _assert_error(_post(completions, None, raw=digits), 400, code="invalid_json")
    deep = b'{"model": "tiny-llama", "prompt": "x", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    _assert_error(_post(completions, None, raw=deep), 400, code="invalid_json")
    # A JSON escape of half a surrogate pair: the Rust tokenizer refuses such a string.
    _assert_error(_post(completions, None, raw=b'{"model": "tiny-llama", "prompt": "hi \\ud83d"}'), 400, "prompt")
    _assert_error(_post(chat, None, raw=b'{"model": "tiny-llama", "messages": [{"role": "user", "content": '
                                        b'"hi \\ud83d"}]}'), 400, "messages")
    _still_serves(live)


def test_fields_that_cannot_be_honoured_are_400_naming_them(live: LiveServer) -> None:
    chat = live.url + "/v1/chat/completions"
    base = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    for extra in [{"top_logprobs": 3}, {"tool_choice": "required"}, {"functions": [{"name": "f"}]},
                  {"repetition_penalty": 1.3}, {"min_tokens": 2}, {"min_p": 0.05},
                  {"guided_choice": ["a", "b"]}, {"stream_options": {"include_usage": True}}]:
        (param,) = extra
        _assert_error(_post(chat, {**base, **extra}), 400, param)
    _still_serves(live)


def test_unknown_slo_class_header_is_400(live: LiveServer) -> None:
    resp = _post(live.url + "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2},
                 headers={"x-pdserve-slo-class": "made-up-class"})
    _assert_error(resp, 400, "x-pdserve-slo-class", "unknown_slo_class")
    assert "made-up-class" not in httpx.get(live.url + "/metrics").text
    _still_serves(live)


def test_unknown_routes_and_methods(live: LiveServer) -> None:
    _assert_error(httpx.get(live.url + "/v1/nothing-here"), 404, code="not_found")
    _assert_error(httpx.get(live.url + "/v1/completions"), 405)
    _still_serves(live)


def test_openai_client_sees_typed_errors(live: LiveServer) -> None:
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", n=2)
    assert "n=1" in str(info.value)
    with pytest.raises(openai.APIStatusError) as too_long:
        client.completions.create(model=MODEL, prompt=[7] * 2100)
    assert too_long.value.status_code == 413


def test_deadline_gives_504(live: LiveServer) -> None:
    resp = _post(live.url + "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 500, "ignore_eos": True},
                 headers={"x-pdserve-timeout-s": "0.2"})
    _assert_error(resp, 504, code="deadline_exceeded")
    _assert_error(_post(live.url + "/v1/completions", {"model": MODEL, "prompt": "x"},
                        headers={"x-pdserve-timeout-s": "-1"}), 400, param="x-pdserve-timeout-s")
    _wait_idle(live)
    _still_serves(live)


def _wait_idle(live: LiveServer, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if live.backend.num_running == 0 and not live.engine.has_unfinished():
            return
        time.sleep(0.02)
    raise AssertionError(f"engine still busy: backend {live.backend.num_running}, "
                         f"engine unfinished {live.engine.has_unfinished()}")


@pytest.fixture()
def second_server(live: LiveServer, request: pytest.FixtureRequest) -> Iterator[ServerHandle]:
    """Another app over the same backend, with the create_app options the test parametrizes."""
    options = request.param
    app = create_app(live.backend, live.tokenizer, MODEL, metrics=live.metrics, **options)
    handle = serve(app, "127.0.0.1", 0)
    yield handle
    handle.stop()


@pytest.mark.parametrize("second_server", [{"api_key": "s3cret"}], indirect=True)
def test_api_key_required_except_health(live: LiveServer, second_server: ServerHandle) -> None:
    url = second_server.url
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
    _assert_error(httpx.get(url + "/v1/models"), 401, code="invalid_api_key")
    _assert_error(httpx.get(url + "/metrics"), 401)
    _assert_error(httpx.post(url + "/v1/completions", json=body), 401)
    _assert_error(httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}), 401)
    _assert_error(httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": "s3cret"}), 401)
    assert httpx.get(url + "/health").status_code == 200
    good = {"Authorization": "Bearer s3cret"}
    assert httpx.get(url + "/v1/models", headers=good).status_code == 200
    assert httpx.post(url + "/v1/completions", json=body, headers=good).status_code == 200
    client = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


@pytest.mark.parametrize(
    "second_server",
    [{"limits": ServerLimits(max_context_tokens=2048, max_concurrent_requests=1, retry_after_s=2.5)}],
    indirect=True,
)
def test_front_end_limit_gives_429_with_retry_after(live: LiveServer, second_server: ServerHandle) -> None:
    url = second_server.url + "/v1/completions"
    holder = {"model": MODEL, "prompt": "x", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as client, client.stream("POST", url, json=holder) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()  # kept referenced: a collected iterator would close the connection
        assert next(lines).startswith("data:")  # the first token arrived: the one allowed request is in flight
        resp = _post(url, {"model": MODEL, "prompt": "y", "max_tokens": 2})
        _assert_error(resp, 429, code="too_many_requests")
        assert resp.headers["retry-after"] == "3"
    _wait_idle(live)  # closing the stream aborted the holder and freed its slot
    assert _post(url, {"model": MODEL, "prompt": "y", "max_tokens": 2}).status_code == 200


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
@pytest.mark.parametrize("second_server", [{"api_key": "s3cret"}], indirect=True)
def test_the_curl_hint_of_up_works_with_an_api_key(
    live: LiveServer, second_server: ServerHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PDSERVE_API_KEY", "s3cret")  # the key given through the environment
    hint = curl_hint(second_server.url, MODEL, "s3cret")
    assert "s3cret" not in hint
    out = subprocess.run(["bash", "-c", hint + " -sS"], capture_output=True, text=True, timeout=60,
                         env={**os.environ}, check=True).stdout
    assert json.loads(out)["choices"][0]["text"] is not None, out
    monkeypatch.delenv("PDSERVE_API_KEY")  # given with --api-key: the hint says to export it
    assert curl_hint(second_server.url, MODEL, "s3cret").endswith("(with PDSERVE_API_KEY set to the --api-key value)")
    assert "Authorization" not in curl_hint(second_server.url, MODEL, None)


@pytest.mark.parametrize("second_server", [{"limits": ServerLimits(max_body_bytes=4096)}], indirect=True)
def test_a_body_over_the_size_limit_is_413(live: LiveServer, second_server: ServerHandle) -> None:
    url = second_server.url + "/v1/completions"
    big = {"model": MODEL, "prompt": "word " * 2000, "max_tokens": 2}
    _assert_error(httpx.post(url, json=big, timeout=30), 413, code="request_too_large")

    def chunked() -> Iterator[bytes]:  # no content-length: the limit applies to the bytes as they arrive
        payload = json.dumps(big).encode()
        for i in range(0, len(payload), 1000):
            yield payload[i:i + 1000]

    _assert_error(httpx.post(url, content=chunked(), headers={"content-type": "application/json"}, timeout=30), 413,
                  code="request_too_large")
    small = httpx.post(url, json={"model": MODEL, "prompt": "small", "max_tokens": 2}, timeout=30)
    assert small.status_code == 200, small.text


def test_a_huge_prompt_is_tokenized_off_the_event_loop(live: LiveServer) -> None:
    prompt = "The key-value cache is stored in fixed-size blocks. " * 60_000  # ~3 MB, ~800k tokens
    answer: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: answer.append(
        _post(live.url + "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 2})))
    sender.start()
    health_s: list[float] = []
    while sender.is_alive():
        started = time.monotonic()
        assert httpx.get(live.url + "/health", timeout=30).status_code == 200
        health_s.append(time.monotonic() - started)
        time.sleep(0.02)
    sender.join()
    _assert_error(answer[0], 413, "prompt", "context_length_exceeded")
    assert max(health_s) < 1.0, health_s  # /health answered throughout...
    assert len(health_s) >= 5, health_s  # ...the seconds that tokenizing took
    _still_serves(live)
