"""Error objects and the mapping from backend failures to HTTP statuses."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from orchestrator.runtime.backend import (
    BackendError,
    DeadlineExceeded,
    GenerationFailed,
    InvalidRequest,
    RequestRejected,
)
from orchestrator.runtime.http.errors import from_backend_error, from_validation_error, rejected
from orchestrator.runtime.http.schemas import ChatCompletionRequest, CompletionRequest
from orchestrator.runtime.metrics import RequestOutcome


@pytest.mark.parametrize(
    ("exc", "status", "type_", "outcome"),
    [
        (RequestRejected("overloaded", 2.2), 429, "rate_limit_error", RequestOutcome.REJECTED),
        (InvalidRequest("prompt too long"), 400, "invalid_request_error", RequestOutcome.INVALID),
        (GenerationFailed("no decode instance"), 503, "service_unavailable_error", RequestOutcome.ERROR),
        (DeadlineExceeded("late"), 504, "timeout_error", RequestOutcome.ERROR),
        (BackendError("odd"), 500, "server_error", RequestOutcome.ERROR),
    ],
)
def test_backend_errors_map_to_statuses(exc: BackendError, status: int, type_: str, outcome: RequestOutcome) -> None:
    err = from_backend_error(exc)
    assert err.status == status
    assert err.outcome is outcome
    body = err.body()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert body["type"] == type_
    assert str(exc) in body["message"]


def test_retry_after_is_whole_seconds_at_least_one() -> None:
    assert from_backend_error(RequestRejected("queue_full", 2.2)).headers == {"Retry-After": "3"}
    assert rejected("overloaded", 0.1).headers == {"Retry-After": "1"}
    assert rejected("overloaded", None).headers == {"Retry-After": "1"}
    assert from_backend_error(RequestRejected("queue_full", 2.2)).code == "queue_full"


def test_validation_errors_name_the_field() -> None:
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "temperature": -1})
    err = from_validation_error(info.value)
    assert err.status == 400 and err.param == "temperature"
    assert "temperature" in err.message


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"model": "m", "prompt": "x", "n": 2}, "only n=1"),
        ({"model": "m", "prompt": "x", "max_tokens": -3}, "max_tokens"),
        ({"model": "m", "prompt": ["a", "b"]}, "one prompt"),
        ({"model": "m", "prompt": [1, -2]}, ">= 0"),
        ({"model": "m", "prompt": []}, "empty"),
        ({"model": "m", "prompt": "x", "logprobs": 2}, "logprobs"),
        ({"model": "m", "prompt": "x", "stop": [""]}, "non-empty"),
        ({"model": "m"}, "prompt"),
    ],
)
def test_completion_schema_rejects_unsupported_input(body: dict, needle: str) -> None:
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate(body)
    assert needle in from_validation_error(info.value).message


def test_completion_schema_unwraps_single_prompts_and_ignores_unknown_fields() -> None:
    assert CompletionRequest.model_validate({"model": "m", "prompt": [[5, 6]]}).single_prompt() == [5, 6]
    assert CompletionRequest.model_validate({"model": "m", "prompt": ["hi"]}).single_prompt() == "hi"
    req = CompletionRequest.model_validate({"model": "m", "prompt": "hi", "presence_penalty": None})
    assert req.single_prompt() == "hi" and req.max_tokens == 16


def test_chat_schema() -> None:
    req = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                  {"type": "text", "text": "b"}]}],
         "max_tokens": 4, "max_completion_tokens": 9, "stream_options": {"include_usage": True}, "stream": True}
    )
    assert req.messages[0].text() == "ab"
    assert req.max_new_tokens() == 9
    assert req.include_usage
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"model": "m", "messages": []})
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "robot", "content": "x"}]})
