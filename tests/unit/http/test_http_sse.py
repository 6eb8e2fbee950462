"""SSE framing and OpenAI chunk / response shapes."""

from __future__ import annotations

import json

from orchestrator.runtime.backend import FinishReason
from orchestrator.runtime.http.sse import (
    SSE_DONE,
    ResponseKind,
    ResponseMeta,
    full_response,
    sse_event,
    stream_chunk,
    usage_chunk,
)

COMPLETION = ResponseMeta("cmpl-1", 1700000000, "tiny", ResponseKind.COMPLETION)
CHAT = ResponseMeta("chatcmpl-1", 1700000000, "tiny", ResponseKind.CHAT)


def _decode(event: bytes) -> dict:
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert b"\n" not in event[:-2], "one event must be one line"
    return json.loads(event[len(b"data: ") : -2])


def test_event_framing_round_trips_unicode_and_newlines() -> None:
    payload = {"text": "héllo\nworld ✓"}
    event = sse_event(payload)
    assert _decode(event) == payload
    assert SSE_DONE == b"data: [DONE]\n\n"


def test_completion_chunk_shape() -> None:
    chunk = stream_chunk(COMPLETION, " world", None, first=False)
    assert chunk == {
        "id": "cmpl-1", "object": "text_completion", "created": 1700000000, "model": "tiny",
        "choices": [{"index": 0, "text": " world", "logprobs": None, "finish_reason": None}],
    }
    last = stream_chunk(COMPLETION, "", FinishReason.LENGTH, first=False)
    assert last["choices"][0]["finish_reason"] == "length"


def test_chat_chunks_carry_role_first_then_content_only() -> None:
    first = stream_chunk(CHAT, "Hi", None, first=True)
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "Hi"}
    middle = stream_chunk(CHAT, " there", None, first=False)
    assert middle["choices"][0]["delta"] == {"content": " there"}
    end = stream_chunk(CHAT, "", FinishReason.STOP, first=False)
    assert end["choices"][0]["delta"] == {}
    assert end["choices"][0]["finish_reason"] == "stop"


def test_usage_chunk_has_no_choices() -> None:
    chunk = usage_chunk(CHAT, prompt_tokens=7, completion_tokens=5)
    assert chunk["choices"] == []
    assert chunk["usage"] == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}


def test_full_responses() -> None:
    body = full_response(CHAT, "Hello", FinishReason.ABORT, 3, 2)
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello"}
    assert body["choices"][0]["finish_reason"] == "abort"
    assert body["usage"]["total_tokens"] == 5
    text = full_response(COMPLETION, "abc", FinishReason.STOP, 1, 1)
    assert text["object"] == "text_completion" and text["choices"][0]["text"] == "abc"
