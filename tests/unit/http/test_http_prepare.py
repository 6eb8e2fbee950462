"""Tokenization, chat templates, context bounds, sampling and timeout parsing."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from orchestrator.runtime.http.chat import DEFAULT_CHAT_TEMPLATE, ChatTemplateError, render_chat
from orchestrator.runtime.http.config import ServerLimits
from orchestrator.runtime.http.errors import APIError
from orchestrator.runtime.http.prepare import build_request, max_new_tokens, timeout_s
from orchestrator.runtime.http.schemas import ChatCompletionRequest, CompletionRequest
from orchestrator.runtime.http.tokenizer import HFTokenizer


class WordTokenizer:
    """One token per whitespace-separated word; ids are word lengths (enough to count)."""

    chat_template: str | None = None
    bos_token: str | None = "<s>"
    eos_token: str | None = "</s>"
    vocab_size = 100

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool]] = []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.calls.append((text, add_special_tokens))
        ids = [len(w) for w in text.split()]
        return ([1] if add_special_tokens else []) + ids


def test_default_template_renders_roles_and_generation_prompt() -> None:
    text = render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                       None, "<s>", "</s>")
    assert text == "<s><|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n"
    assert render_chat([{"role": "user", "content": "x"}], DEFAULT_CHAT_TEMPLATE, None, None,
                       add_generation_prompt=False) == "<|user|>\nx\n"


def test_model_template_is_used_and_raise_exception_surfaces() -> None:
    template = "{% for m in messages %}[{{ m['role'] }}:{{ m['content'] }}]{% endfor %}"
    assert render_chat([{"role": "user", "content": "a"}], template, None, None) == "[user:a]"
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}"
    with pytest.raises(ChatTemplateError, match="first must be user"):
        render_chat([{"role": "assistant", "content": "a"}], strict, None, None)
    with pytest.raises(ChatTemplateError):
        render_chat([{"role": "user", "content": "a"}], "{% for %}", None, None)


def test_chat_prompt_is_tokenized_without_extra_special_tokens() -> None:
    tok = WordTokenizer()
    body = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "a b"}]})
    req = build_request(body, {}, "r1", 100.0, tok, ServerLimits(max_context_tokens=64))
    assert tok.calls[-1][1] is False
    assert len(req.prompt_token_ids) == len(tok.calls[-1][0].split())
    # chat without max_tokens fills the rest of the window
    assert req.sampling.max_tokens == 64 - len(req.prompt_token_ids)
    assert req.deadline_s == 100.0 + ServerLimits().default_timeout_s
    assert req.slo_class == "default"


def test_completion_request_fields_reach_sampling() -> None:
    tok = WordTokenizer()
    body = CompletionRequest.model_validate(
        {"model": "m", "prompt": "one two three", "max_tokens": 5, "temperature": 0.5, "top_p": 0.9,
         "top_k": -1, "seed": 7, "stop": "END", "ignore_eos": True}
    )
    req = build_request(body, {"x-pdserve-slo-class": "batch", "x-pdserve-timeout-s": "2.5"}, "r", 10.0, tok,
                        ServerLimits(slo_classes=frozenset({"default", "batch"})))
    assert req.prompt_token_ids == (1, 3, 3, 5)
    s = req.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed, s.stop, s.ignore_eos) == (
        5, 0.5, 0.9, 0, 7, ("END",), True)
    assert req.deadline_s == 12.5 and req.slo_class == "batch"


@pytest.mark.parametrize("prompt", [[5, 100], [[7, 10**9]]])
def test_token_ids_outside_the_vocabulary_are_400_naming_the_id(prompt: list) -> None:
    body = CompletionRequest.model_validate({"model": "m", "prompt": prompt})
    with pytest.raises(APIError) as info:
        build_request(body, {}, "r", 0.0, WordTokenizer(), ServerLimits())
    bad = prompt[-1] if isinstance(prompt[-1], int) else prompt[0][-1]
    assert info.value.status == 400 and info.value.param == "prompt" and info.value.code == "invalid_token_id"
    assert str(bad) in info.value.message and "100" in info.value.message
    ok = CompletionRequest.model_validate({"model": "m", "prompt": [0, 99]})
    assert build_request(ok, {}, "r", 0.0, WordTokenizer(), ServerLimits()).prompt_token_ids == (0, 99)


def _hf_tokenizer() -> HFTokenizer:
    """The front end's tokenizer over a real (in-memory) Hugging Face tokenizer."""
    words = WordLevel({"[UNK]": 0, "<s>": 1, "</s>": 2, "hi": 3, "there": 4}, unk_token="[UNK]")
    tokenizer = Tokenizer(words)
    tokenizer.pre_tokenizer = Whitespace()
    return HFTokenizer(tokenizer, None, "<s>", "</s>")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m", "prompt": "hi \ud83d"}, "prompt"),
        ({"model": "m", "prompt": ["\udfff there"]}, "prompt"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"},
                                     {"role": "user", "content": [{"type": "text", "text": "x\ud800"}]}]},
         "messages"),
    ],
)
def test_a_lone_surrogate_in_the_prompt_is_400_naming_the_field(body: dict, param: str) -> None:
    schema = CompletionRequest if "prompt" in body else ChatCompletionRequest
    for tokenizer in (_hf_tokenizer(), WordTokenizer()):
        with pytest.raises(APIError) as info:
            build_request(schema.model_validate(body), {}, "r", 0.0, tokenizer, ServerLimits())
        assert info.value.status == 400 and info.value.param == param
        assert "surrogate" in info.value.message
    # A JSON escape of a surrogate pair is one code point, and fine.
    paired = CompletionRequest.model_validate(json.loads('{"model": "m", "prompt": "hi \\ud83d\\ude00"}'))
    assert build_request(paired, {}, "r", 0.0, _hf_tokenizer(), ServerLimits()).prompt_token_ids == (3, 0)


def test_stop_token_ids_reach_sampling_and_must_lie_in_the_vocabulary() -> None:
    body = CompletionRequest.model_validate({"model": "m", "prompt": "a", "stop_token_ids": [7, 99]})
    assert build_request(body, {}, "r", 0.0, WordTokenizer(), ServerLimits()).sampling.stop_token_ids == (7, 99)
    outside = CompletionRequest.model_validate({"model": "m", "prompt": "a", "stop_token_ids": [7, 100]})
    with pytest.raises(APIError) as info:
        build_request(outside, {}, "r", 0.0, WordTokenizer(), ServerLimits())
    err = info.value
    assert err.status == 400 and err.param == "stop_token_ids" and err.code == "invalid_token_id"
    assert "100" in err.message


def test_add_generation_prompt_false_ends_the_prompt_after_the_messages() -> None:
    tok = WordTokenizer()
    body = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "a b"}], "add_generation_prompt": False})
    build_request(body, {}, "r", 0.0, tok, ServerLimits())
    assert tok.calls[-1][0] == "<s><|user|>\na b</s>\n"
    build_request(body.model_copy(update={"add_generation_prompt": True}), {}, "r", 0.0, tok, ServerLimits())
    assert tok.calls[-1][0].endswith("<|assistant|>\n")


def test_context_bounds() -> None:
    limits = ServerLimits(max_context_tokens=10)
    body = CompletionRequest.model_validate({"model": "m", "prompt": [1] * 10})
    with pytest.raises(APIError) as too_long:
        max_new_tokens(body, 10, limits)
    assert too_long.value.status == 413
    body = CompletionRequest.model_validate({"model": "m", "prompt": [1] * 4, "max_tokens": 7})
    with pytest.raises(APIError) as no_room:
        max_new_tokens(body, 4, limits)
    assert no_room.value.status == 400 and no_room.value.param == "max_tokens"
    assert max_new_tokens(body, 3, limits) == 7
    chat = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert max_new_tokens(chat, 4, ServerLimits(max_context_tokens=10, default_max_tokens=3)) == 3


@pytest.mark.parametrize("raw", ["0", "-1", "abc", "nan", "100000"])
def test_bad_timeout_header_is_400(raw: str) -> None:
    with pytest.raises(APIError) as info:
        timeout_s({"x-pdserve-timeout-s": raw}, ServerLimits())
    assert info.value.status == 400 and info.value.param == "x-pdserve-timeout-s"


@pytest.mark.parametrize("header", ["batch", "interactive-" + "x" * 500, "Default"])
def test_an_slo_class_that_is_not_configured_is_400_naming_the_header(header: str) -> None:
    body = CompletionRequest.model_validate({"model": "m", "prompt": "a"})
    with pytest.raises(APIError) as info:
        build_request(body, {"x-pdserve-slo-class": header}, "r", 0.0, WordTokenizer(), ServerLimits())
    err = info.value
    assert err.status == 400 and err.param == "x-pdserve-slo-class" and err.code == "unknown_slo_class"
    assert "default" in err.message and len(err.message) < 300
    assert build_request(body, {}, "r", 0.0, WordTokenizer(), ServerLimits()).slo_class == "default"


def test_limits_validate() -> None:
    with pytest.raises(ValueError, match="default_timeout_s"):
        ServerLimits(default_timeout_s=10, max_timeout_s=5)
    with pytest.raises(ValueError, match="max_concurrent_requests"):
        ServerLimits(max_concurrent_requests=0)
    with pytest.raises(ValueError, match="slo_classes"):
        ServerLimits(slo_classes=frozenset({"batch"}))
