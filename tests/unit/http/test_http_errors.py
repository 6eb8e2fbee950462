"""Error objects and the mapping from backend failures to HTTP statuses."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError

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
        (ChatCompletionRequest, {**_CHAT, "top_logprobs": 5}, "top_logprobs"),
        (ChatCompletionRequest, {**_CHAT, "top_logprobs": 0}, "top_logprobs"),
        (ChatCompletionRequest, {**_CHAT, "tool_choice": "required"}, "tool_choice"),
        (ChatCompletionRequest, {**_CHAT, "tool_choice": {"type": "function", "function": {"name": "f"}}},
         "tool_choice"),
        (ChatCompletionRequest, {**_CHAT, "functions": [{"name": "f", "parameters": {}}]}, "functions"),
        (ChatCompletionRequest, {**_CHAT, "function_call": {"name": "f"}}, "function_call"),
        (ChatCompletionRequest, {**_CHAT, "continue_final_message": True}, "continue_final_message"),
        (ChatCompletionRequest, {**_CHAT, "chat_template": "{{ messages }}"}, "chat_template"),
        (ChatCompletionRequest, {**_CHAT, "chat_template_kwargs": {"enable_thinking": False}},
         "chat_template_kwargs"),
        (ChatCompletionRequest, {**_CHAT, "echo": True}, "echo"),
        (ChatCompletionRequest, {**_CHAT, "best_of": 2}, "best_of"),
        (CompletionRequest, {**_COMPLETION, "response_format": {"type": "json_object"}}, "response_format"),
        (CompletionRequest, {**_COMPLETION, "stream_options": {"include_usage": True}}, "stream_options"),
        (ChatCompletionRequest, {**_CHAT, "stream": False, "stream_options": {}}, "stream_options"),
        (CompletionRequest, {**_COMPLETION, "stop_token_ids": [3, -1]}, "stop_token_ids"),
        (CompletionRequest, {**_COMPLETION, "stop_token_ids": list(range(1025))}, "stop_token_ids"),
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


# vLLM's sampling extensions, each with a value that would change the answer.
_VLLM_EXTENSIONS = {
    "repetition_penalty": 1.2, "min_tokens": 3, "min_p": 0.1, "length_penalty": 0.5, "use_beam_search": True,
    "include_stop_str_in_output": True, "skip_special_tokens": False, "spaces_between_special_tokens": False,
    "prompt_logprobs": 0, "truncate_prompt_tokens": 8, "allowed_token_ids": [1, 2], "bad_words": ["no"],
    "guided_json": {"type": "object"}, "guided_regex": "[a-z]+", "guided_choice": ["yes", "no"],
    "guided_grammar": "root ::= 'a'", "structured_outputs": {"regex": "a+"},
}


@pytest.mark.parametrize("schema", [CompletionRequest, ChatCompletionRequest])
@pytest.mark.parametrize(("field", "value"), _VLLM_EXTENSIONS.items())
def test_vllm_extensions_that_cannot_be_honoured_are_400_naming_the_field(
    schema: type, field: str, value: object
) -> None:
    body = _COMPLETION if schema is CompletionRequest else _CHAT
    with pytest.raises(ValidationError) as info:
        schema.model_validate({**body, field: value})
    err = from_validation_error(info.value)
    assert err.status == 400 and err.param == field
    assert field in err.message and "supported" in err.message


def test_neutral_values_of_extensions_are_accepted() -> None:
    neutral = {"repetition_penalty": 1.0, "min_tokens": 0, "min_p": 0, "length_penalty": 1, "use_beam_search": False,
               "include_stop_str_in_output": False, "skip_special_tokens": True,
               "spaces_between_special_tokens": True, "bad_words": [], "response_format": {"type": "text"}}
    assert CompletionRequest.model_validate({**_COMPLETION, **neutral}).min_tokens == 0
    chat = ChatCompletionRequest.model_validate(
        {**_CHAT, **neutral, "tool_choice": "none", "function_call": "auto", "tools": [], "functions": [],
         "continue_final_message": False, "chat_template_kwargs": {}, "logprobs": False, "top_logprobs": None,
         "stream": True, "stream_options": {"include_usage": True}})
    assert chat.tool_choice == "none" and chat.include_usage
    assert ChatCompletionRequest.model_validate({**_CHAT, "tool_choice": "auto"}).tool_choice == "auto"


def _optional_fields(schema: type[BaseModel]) -> list[str]:
    return [name for name, info in schema.model_fields.items() if not info.is_required()]


@pytest.mark.parametrize(
    ("schema", "field"),
    [(CompletionRequest, f) for f in _optional_fields(CompletionRequest)]
    + [(ChatCompletionRequest, f) for f in _optional_fields(ChatCompletionRequest)],
)
def test_a_null_optional_field_means_its_default(schema: type[BaseModel], field: str) -> None:
    body = _COMPLETION if schema is CompletionRequest else _CHAT
    default = getattr(schema.model_validate(body), field)
    assert getattr(schema.model_validate({**body, field: None}), field) in (default, None)


def test_nulls_the_openai_client_sends_take_the_defaults() -> None:
    nulls = {"temperature": None, "top_p": None, "n": None, "stream": None, "top_k": None, "ignore_eos": None,
             "echo": None, "stream_options": None, "seed": None, "stop": None}
    req = CompletionRequest.model_validate({**_COMPLETION, **nulls, "max_tokens": None})
    assert (req.temperature, req.top_p, req.n, req.stream, req.top_k, req.ignore_eos, req.echo) == (
        1.0, 1.0, 1, False, 0, False, False)
    assert req.max_tokens is None  # null is a value of max_tokens: no limit but the context window
    chat = ChatCompletionRequest.model_validate({**_CHAT, **nulls, "add_generation_prompt": None})
    assert (chat.temperature, chat.stream, chat.add_generation_prompt) == (1.0, False, True)
    options = ChatCompletionRequest.model_validate({**_CHAT, "stream": True, "stream_options": {"include_usage": None}})
    assert not options.include_usage
    message = ChatCompletionRequest.model_validate(
        {**_CHAT, "messages": [{"role": "assistant", "content": None, "name": None}]}).messages[0]
    assert message.text() == ""


@pytest.mark.parametrize(
    ("schema", "field"),
    [(CompletionRequest, "model"), (CompletionRequest, "prompt"), (ChatCompletionRequest, "model"),
     (ChatCompletionRequest, "messages")],
)
def test_a_null_required_field_is_400_naming_it(schema: type[BaseModel], field: str) -> None:
    body = _COMPLETION if schema is CompletionRequest else _CHAT
    with pytest.raises(ValidationError) as info:
        schema.model_validate({**body, field: None})
    err = from_validation_error(info.value)
    assert err.status == 400 and err.param is not None and err.param.split(".")[0] == field
