"""Response bodies in OpenAI's formats and their server-sent-event framing (pure).

A streamed response is a sequence of ``data: {json}\\n\\n`` events:

1. chunks carrying text deltas (a chat stream's first chunk also carries
   ``role: assistant``); the last of them carries ``finish_reason``;
2. when the request set ``stream_options.include_usage``, one more chunk
   with ``choices: []`` and ``usage`` (exactly as OpenAI does; pdserve sends
   usage only when asked, so strict clients see no unknown chunk);
3. ``data: [DONE]``.

An error after the stream has started is sent as one event holding the
OpenAI error object, then ``data: [DONE]``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Any

from orchestrator.runtime.backend import FinishReason

SSE_DONE = b"data: [DONE]\n\n"


class ResponseKind(str, Enum):
    """Which endpoint's format a response follows."""

    COMPLETION = "text_completion"
    CHAT = "chat.completion"


@dataclass(frozen=True, slots=True)
class ResponseMeta:
    """Fields every chunk of one response repeats."""

    response_id: str
    created_s: int
    model: str
    kind: ResponseKind


def sse_event(payload: dict[str, Any]) -> bytes:
    """Frame one JSON payload as a server-sent event."""
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def finish_reason_value(reason: FinishReason | None) -> str | None:
    """OpenAI's ``finish_reason`` string for a backend finish reason."""
    return None if reason is None else reason.value


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's ``usage`` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _chunk_object(kind: ResponseKind) -> str:
    return "text_completion" if kind is ResponseKind.COMPLETION else "chat.completion.chunk"


def stream_chunk(meta: ResponseMeta, text: str, finish_reason: FinishReason | None, first: bool) -> dict[str, Any]:
    """One streamed chunk carrying ``text`` (and ``finish_reason`` on the last one)."""
    choice: dict[str, Any] = {"index": 0}
    if meta.kind is ResponseKind.COMPLETION:
        choice["text"] = text
    else:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text or first:
            delta["content"] = text
        choice["delta"] = delta
    choice["logprobs"] = None
    choice["finish_reason"] = finish_reason_value(finish_reason)
    return {
        "id": meta.response_id,
        "object": _chunk_object(meta.kind),
        "created": meta.created_s,
        "model": meta.model,
        "choices": [choice],
    }


def usage_chunk(meta: ResponseMeta, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """The trailing ``include_usage`` chunk: no choices, only usage."""
    return {
        "id": meta.response_id,
        "object": _chunk_object(meta.kind),
        "created": meta.created_s,
        "model": meta.model,
        "choices": [],
        "usage": usage_dict(prompt_tokens, completion_tokens),
    }


def full_response(
    meta: ResponseMeta, text: str, finish_reason: FinishReason | None, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """A non-streamed response body."""
    choice: dict[str, Any] = {"index": 0}
    if meta.kind is ResponseKind.COMPLETION:
        choice["text"] = text
    else:
        choice["message"] = {"role": "assistant", "content": text}
    choice["logprobs"] = None
    choice["finish_reason"] = finish_reason_value(finish_reason)
    return {
        "id": meta.response_id,
        "object": meta.kind.value,
        "created": meta.created_s,
        "model": meta.model,
        "choices": [choice],
        "usage": usage_dict(prompt_tokens, completion_tokens),
    }
