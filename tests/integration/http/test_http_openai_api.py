"""The OpenAI client against a real server on the tiny model: outputs, usage, streaming, concurrency."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import openai
import pytest
from http_live_support import MODEL, LiveServer

from orchestrator.runtime.http.chat import render_chat
from workers.engine.engine import LLMEngine
from workers.engine.sampling_params import SamplingParams

PROMPT = "Hello! How are you today? Please write a short poem about the sea"


def _client(live: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _expected(engine: LLMEngine, prompt_ids: list[int], max_tokens: int) -> tuple[str, int, str]:
    [result] = engine.generate([prompt_ids], SamplingParams(max_tokens=max_tokens))
    return result.text, len(result.token_ids), result.finish_reason.value


def test_models_lists_the_served_model(live: LiveServer) -> None:
    models = _client(live).models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_completion_matches_engine_greedy(live: LiveServer, reference_engine: LLMEngine) -> None:
    ids = live.tokenizer.encode(PROMPT)
    text, num_tokens, reason = _expected(reference_engine, ids, 12)
    resp = _client(live).completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    assert resp.choices[0].text == text
    assert resp.choices[0].finish_reason == reason
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (len(ids), num_tokens)
    # the same prompt sent as token ids gives the same answer
    by_ids = _client(live).completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == text


def test_streamed_completion_matches_engine_greedy(live: LiveServer, reference_engine: LLMEngine) -> None:
    ids = live.tokenizer.encode(PROMPT)
    text, num_tokens, reason = _expected(reference_engine, ids, 10)
    stream = _client(live).completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    content = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in content) == text
    assert [c.choices[0].finish_reason for c in content][-1] == reason
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (len(ids), num_tokens)


def test_chat_matches_engine_greedy_streamed_and_not(live: LiveServer, reference_engine: LLMEngine) -> None:
    messages: list[Any] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three fruits."}]
    prompt = render_chat(messages, live.tokenizer.chat_template, live.tokenizer.bos_token, live.tokenizer.eos_token)
    ids = live.tokenizer.encode(prompt, add_special_tokens=False)
    assert live.engine.tokenizer is not None
    assert ids[0] == live.engine.tokenizer.bos_token_id  # the model's template put BOS in
    text, num_tokens, reason = _expected(reference_engine, ids, 9)
    client = _client(live)
    resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=9, temperature=0)
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == text
    assert resp.choices[0].finish_reason == reason
    assert resp.usage is not None and resp.usage.prompt_tokens == len(ids)
    assert resp.usage.completion_tokens == num_tokens
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=9, temperature=0, stream=True,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == reason
    assert all(c.usage is None for c in chunks)  # usage only when stream_options asks for it


def test_stop_token_ids_end_the_answer_at_that_token(live: LiveServer, reference_engine: LLMEngine) -> None:
    ids = live.tokenizer.encode(PROMPT)
    [free] = reference_engine.generate([ids], SamplingParams(max_tokens=12, ignore_eos=True))
    # the first generated token after the first that did not come earlier: the answer stops at its first use
    at = next(i for i, t in enumerate(free.token_ids) if i > 0 and t not in free.token_ids[:i])
    stop_id = free.token_ids[at]
    [expected] = reference_engine.generate(
        [ids], SamplingParams(max_tokens=12, ignore_eos=True, stop_token_ids=(stop_id,)))
    assert len(expected.token_ids) == at + 1
    resp = _client(live).completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
        extra_body={"stop_token_ids": [stop_id], "ignore_eos": True},
    )
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None and resp.usage.completion_tokens == at + 1
    assert resp.choices[0].text == expected.text


def test_the_openai_client_may_send_null_for_optional_fields(live: LiveServer) -> None:
    messages: list[Any] = [{"role": "user", "content": "hi"}]
    resp = _client(live).chat.completions.create(
        model=MODEL, messages=messages, max_tokens=2, temperature=None, top_p=None, n=None, stream=None,
    )
    assert resp.choices[0].finish_reason in ("stop", "length")


def test_request_id_is_echoed(live: LiveServer) -> None:
    raw = _client(live).completions.with_raw_response.create(
        model=MODEL, prompt="hi", max_tokens=2, extra_headers={"x-request-id": "my-id-42"},
    )
    assert raw.headers["x-request-id"] == "my-id-42"

    async def twice() -> list[int]:
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as client:
            body = {"model": MODEL, "prompt": "same id", "max_tokens": 6}
            responses = await asyncio.gather(*(
                client.post("/v1/completions", json=body, headers={"x-request-id": "dup"}) for _ in range(2)
            ))
        assert all(r.headers["x-request-id"] == "dup" for r in responses)
        return [r.status_code for r in responses]

    assert asyncio.run(twice()) == [200, 200]  # a reused client id never collides in the backend


@pytest.mark.slow
def test_32_concurrent_requests_all_complete(live: LiveServer) -> None:
    async def run() -> list[tuple[str | None, int]]:
        client = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=120)

        async def one(i: int) -> tuple[str | None, int]:
            if i % 2:
                resp = await client.completions.create(
                    model=MODEL, prompt=f"request number {i}: the numbers from one to twenty", max_tokens=8,
                    temperature=0.7, seed=i,
                )
                assert resp.usage is not None
                return resp.choices[0].finish_reason, resp.usage.completion_tokens
            stream = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"tell me about {i}"}], max_tokens=8,
                stream=True, stream_options={"include_usage": True},
            )
            reason, tokens = None, 0
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].finish_reason:
                    reason = chunk.choices[0].finish_reason
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
            return reason, tokens

        try:
            return await asyncio.gather(*(one(i) for i in range(32)))
        finally:
            await client.close()

    results = asyncio.run(run())
    assert len(results) == 32
    for reason, tokens in results:
        assert reason in ("stop", "length")
        assert 1 <= tokens <= 8
        if reason == "length":
            assert tokens == 8
    assert live.backend.num_running == 0
