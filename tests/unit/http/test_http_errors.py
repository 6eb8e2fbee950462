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


_CHAT = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
_COMPLETION = {"model": "m", "prompt": "x"}


@pytest.mark.parametrize(
    ("schema", "body", "param"),
    [
        (CompletionRequest, {**_COMPLETION, "seed": 2**63}, "seed"),
        (CompletionRequest, {**_COMPLETION, "seed": -(2**63) - 1}, "seed"),
        (ChatCompletionRequest, {**_CHAT, "seed": 10**30}, "seed"),
        (CompletionRequest, {**_COMPLETION, "best_of": 2}, "best_of"),
        (CompletionRequest, {**_COMPLETION, "presence_penalty": 0.5}, "presence_penalty"),
        (ChatCompletionRequest, {**_CHAT, "frequency_penalty": -1.0}, "frequency_penalty"),
        (CompletionRequest, {**_COMPLETION, "logit_bias": {"50": 10}}, "logit_bias"),
        (ChatCompletionRequest, {**_CHAT, "response_format": {"type": "json_object"}}, "response_format"),
        (ChatCompletionRequest, {**_CHAT, "response_format": {"type": "json_schema", "json_schema": {}}},
         "response_format"),
        (CompletionRequest, {**_COMPLETION, "echo": True}, "echo"),
        (CompletionRequest, {**_COMPLETION, "logprobs": 1}, "logprobs"),
        (CompletionRequest, {**_COMPLETION, "suffix": "!"}, "suffix"),
        (ChatCompletionRequest, {**_CHAT, "logprobs": True}, "logprobs"),
        (ChatCompletionRequest, {**_CHAT, "tools": [{"type": "function"}]}, "tools"),
    ],
)
def test_fields_that_cannot_be_honoured_are_400_naming_the_field(schema: type, body: dict, param: str) -> None:
    with pytest.raises(ValidationError) as info:
        schema.model_validate(body)
    err = from_validation_error(info.value)
    assert err.status == 400 and err.param == param
    assert param in err.message


def test_neutral_values_of_unsupported_fields_are_accepted() -> None:
    neutral = {"best_of": 1, "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "echo": False,
               "seed": 2**63 - 1}
    assert CompletionRequest.model_validate({**_COMPLETION, **neutral}).seed == 2**63 - 1
    chat = ChatCompletionRequest.model_validate({**_CHAT, "response_format": {"type": "text"}, "seed": -(2**63),
                                                 "presence_penalty": None, "logit_bias": None})
    assert chat.seed == -(2**63)
