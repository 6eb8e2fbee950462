"""From a validated OpenAI body to a ``GenerationRequest``: tokenize, bound, build sampling."""

from __future__ import annotations

from collections.abc import Mapping

from orchestrator.runtime.backend import GenerationRequest
from orchestrator.runtime.http.chat import ChatTemplateError, render_chat
from orchestrator.runtime.http.config import DEFAULT_SLO_CLASS, PromptTokenizer, ServerLimits
from orchestrator.runtime.http.errors import APIError, bad_request, context_too_long, model_not_found
from orchestrator.runtime.http.schemas import ChatCompletionRequest, CompletionRequest
from workers.engine.sampling_params import InvalidSamplingParams, SamplingParams

TIMEOUT_HEADER = "x-pdserve-timeout-s"
SLO_CLASS_HEADER = "x-pdserve-slo-class"


def prompt_token_ids(body: CompletionRequest | ChatCompletionRequest, tokenizer: PromptTokenizer) -> list[int]:
    """Token ids of the request's prompt (chat messages rendered through the chat template)."""
    if isinstance(body, CompletionRequest):
        prompt = body.single_prompt()
        if isinstance(prompt, str):
            if not prompt:
                raise bad_request("prompt must not be empty", "prompt")
            _check_unicode(prompt, "prompt", "prompt")
            return tokenizer.encode(prompt, add_special_tokens=True)
        ids = list(prompt)
        _check_vocabulary(ids, tokenizer.vocab_size, "prompt")
        return ids
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    for i, message in enumerate(messages):
        _check_unicode(message["content"], f"messages[{i}].content", "messages")
    try:
        text = render_chat(messages, tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token,
                           body.add_generation_prompt)
    except ChatTemplateError as exc:
        raise bad_request(str(exc), "messages") from exc
    return tokenizer.encode(text, add_special_tokens=False)


def _check_unicode(text: str, where: str, param: str) -> None:
    """400 for a lone UTF-16 surrogate (a JSON escape such as ``"\\ud83d"`` without its pair): not text to tokenize."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad_request(
            f"{where} holds a lone UTF-16 surrogate {text[exc.start]!r} at character {exc.start}, "
            "which is not Unicode text; only valid text can be tokenized",
            param,
        ) from exc


def _check_vocabulary(ids: list[int], vocab_size: int, param: str) -> None:
    """400 naming the first id a client sent that the model has no embedding for (the schema ensures >= 0)."""
    bad = next((t for t in ids if t >= vocab_size), None)
    if bad is not None:
        raise bad_request(
            f"{param} holds token id {bad}, outside the model's vocabulary of {vocab_size} ids [0, {vocab_size})",
            param, code="invalid_token_id",
        )


def max_new_tokens(
    body: CompletionRequest | ChatCompletionRequest, prompt_tokens: int, limits: ServerLimits
) -> int:
    """How many tokens to generate; 413 if the prompt fills the window, 400 if max_tokens does not fit."""
    room = limits.max_context_tokens - prompt_tokens
    if room < 1:
        raise context_too_long(prompt_tokens, limits.max_context_tokens)
    if isinstance(body, CompletionRequest):
        asked = body.max_tokens
        param = "max_tokens"
    else:
        asked = body.max_new_tokens()
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    if asked is None:
        return room if limits.default_max_tokens is None else min(room, limits.default_max_tokens)
    if asked > room:
        raise bad_request(
            f"{param}={asked} plus the prompt's {prompt_tokens} tokens exceeds the context window of "
            f"{limits.max_context_tokens} tokens; at most {room} new tokens fit.",
            param, code="context_length_exceeded",
        )
    return asked


def sampling_params(
    body: CompletionRequest | ChatCompletionRequest, max_tokens: int, vocab_size: int
) -> SamplingParams:
    """The engine's sampling parameters for this body; ``stop_token_ids`` must lie in the vocabulary."""
    stop_token_ids = body.stop_token_ids or []
    _check_vocabulary(stop_token_ids, vocab_size, "stop_token_ids")
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=max(body.top_k, 0),
            seed=body.seed,
            stop_token_ids=tuple(stop_token_ids),
            stop=body.stop_strings(),
            ignore_eos=body.ignore_eos,
        )
    except InvalidSamplingParams as exc:
        raise bad_request(str(exc)) from exc


def timeout_s(headers: Mapping[str, str], limits: ServerLimits) -> float:
    """The request's timeout: the ``x-pdserve-timeout-s`` header if valid, else the default."""
    raw = headers.get(TIMEOUT_HEADER)
    if raw is None:
        return limits.default_timeout_s
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value <= limits.max_timeout_s:  # also rejects NaN
        raise bad_request(
            f"header {TIMEOUT_HEADER} must be a number of seconds in (0, {limits.max_timeout_s}], got {raw!r}",
            TIMEOUT_HEADER,
        )
    return value


def slo_class(headers: Mapping[str, str], limits: ServerLimits) -> str:
    """The request's SLO class: the ``x-pdserve-slo-class`` header if configured, else 400; absent: default."""
    raw = headers.get(SLO_CLASS_HEADER)
    if not raw:
        return DEFAULT_SLO_CLASS
    if raw not in limits.slo_classes:
        shown = raw if len(raw) <= 64 else raw[:64] + "..."
        raise bad_request(
            f"header {SLO_CLASS_HEADER} names SLO class {shown!r}, which this server does not have; "
            f"configured: {', '.join(sorted(limits.slo_classes))}",
            SLO_CLASS_HEADER, code="unknown_slo_class",
        )
    return raw


def build_request(
    body: CompletionRequest | ChatCompletionRequest,
    headers: Mapping[str, str],
    request_id: str,
    arrival_s: float,
    tokenizer: PromptTokenizer,
    limits: ServerLimits,
) -> GenerationRequest:
    """The backend request for ``body``; raises ``APIError`` for anything invalid."""
    slo = slo_class(headers, limits)
    ids = prompt_token_ids(body, tokenizer)
    if not ids:
        raise bad_request("the prompt has no tokens", "prompt")
    sampling = sampling_params(body, max_new_tokens(body, len(ids), limits), tokenizer.vocab_size)
    return GenerationRequest(
        request_id=request_id,
        prompt_token_ids=tuple(ids),
        sampling=sampling,
        arrival_s=arrival_s,
        deadline_s=arrival_s + timeout_s(headers, limits),
        slo_class=slo,
    )


def check_model(requested: str, served: str) -> APIError | None:
    """404 error when ``requested`` is not the served model."""
    return None if requested == served else model_not_found(requested, served)
