"""Request bodies of the OpenAI API subset pdserve serves, validated with pydantic.

How a body's fields are read:

- a ``null`` optional field means its default, as in OpenAI's API and vLLM
  (the openai client sends ``"temperature": null`` for ``temperature=None``);
  a field whose type includes null keeps it (``max_tokens: null``: no limit
  but the context window), and a null required field (``model``, ``prompt``,
  ``messages``) is a 400;
- fields of OpenAI's API and vLLM's extensions that change the answer but
  that pdserve cannot honour (``n`` or ``best_of`` above 1, logprobs, penalties,
  ``logit_bias``, tools and functions, beam search, guided decoding, ...: see
  ``_NEUTRAL``) are accepted only at the value that changes nothing, and
  otherwise rejected with a 400 naming the field rather than silently ignored;
  so are a ``response_format`` other than text and several prompts in one
  request;
- ``stream_options`` needs ``stream: true``, as in vLLM;
- other fields (metadata such as ``store``, ``service_tier`` or ``user``) are
  ignored.

Extensions beyond OpenAI, as in vLLM: ``top_k``, ``ignore_eos``,
``stop_token_ids`` and, for chat, ``add_generation_prompt``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cache
from typing import ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
# The engine checks every generated token against these, so their number is bounded.
MAX_STOP_TOKEN_IDS = 1024


@cache
def _null_means_default(model: type[BaseModel]) -> frozenset[str]:
    """Optional fields of ``model`` whose type excludes null: a null sent for one stands for its default."""
    return frozenset(
        name for name, info in model.model_fields.items()
        if not info.is_required() and type(None) not in get_args(info.annotation)
    )


class _Body(BaseModel):
    """A JSON object of a request: unknown fields ignored, a null optional field means its default."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _nulls_to_defaults(cls, data: object) -> object:
        if not isinstance(data, dict):
            return data
        defaulted = _null_means_default(cls)
        return {key: value for key, value in data.items() if value is not None or key not in defaulted}


class StreamOptions(_Body):
    """``stream_options``: only ``include_usage`` is supported."""

    include_usage: bool = False


def _shown(value: object) -> str:
    """``value`` as JSON, shortened for an error message."""
    text = json.dumps(value, default=repr)
    return text if len(text) <= 60 else text[:60] + "..."


def _not_honoured(name: str, value: object, neutral: tuple[object, ...]) -> str:
    """Why ``value`` of field ``name`` is refused: the neutral values that would be accepted, if telling."""
    telling = [v for v in neutral if isinstance(v, bool | int | float) or (isinstance(v, str) and v)]
    if not telling:
        return f"{name} is not supported"
    return f"only {name}={' or '.join(_shown(v) for v in telling)} is supported, got {_shown(value)}"


class _SamplingFields(_Body):
    """Fields shared by completions and chat completions."""

    # Fields that pdserve cannot honour, with the values that change nothing (null, "not sent", always
    # does). Any other value is a 400 naming the field, so that a client relying on one hears it is
    # not honoured.
    _NEUTRAL: ClassVar[Mapping[str, tuple[object, ...]]] = {
        "n": (1,),
        "best_of": (1,),
        "echo": (False,),
        "presence_penalty": (0,),
        "frequency_penalty": (0,),
        "repetition_penalty": (1,),
        "logit_bias": ({},),
        "min_p": (0,),
        "min_tokens": (0,),
        "use_beam_search": (False,),
        "length_penalty": (1,),
        "include_stop_str_in_output": (False,),
        "skip_special_tokens": (True,),
        "spaces_between_special_tokens": (True,),
        "prompt_logprobs": (),
        "truncate_prompt_tokens": (),
        "allowed_token_ids": (),
        "bad_words": ([],),
        "guided_json": (),
        "guided_regex": (),
        "guided_choice": (),
        "guided_grammar": (),
        "structured_outputs": (),
    }

    model: str
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1, description="extension; 0 or -1 disables top-k")
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX, description="a signed 64-bit integer")
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(default=None, description="extension; stop after any of these tokens")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = Field(default=False, description="extension; keep generating past EOS")
    # JSON modes would need constrained decoding, which the engine does not do.
    response_format: dict[str, object] | None = None
    # Accepted only at their neutral values (``_NEUTRAL``).
    n: int = 1
    best_of: int | None = None
    echo: bool = False
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    min_p: float | None = None
    min_tokens: int | None = None
    use_beam_search: bool | None = None
    length_penalty: float | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    prompt_logprobs: int | None = None
    truncate_prompt_tokens: int | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    guided_json: str | dict[str, object] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict[str, object] | None = None

    # Field validators (not one model validator) so that the 400's ``param`` names the field.
    @field_validator("*")
    @classmethod
    def _only_neutral(cls, value: object, info: ValidationInfo) -> object:
        neutral = cls._NEUTRAL.get(info.field_name or "")
        if neutral is None or value is None or value in neutral:
            return value
        raise ValueError(_not_honoured(info.field_name or "", value, neutral))

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, options: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if options is not None and info.data.get("stream") is False:
            raise ValueError("stream_options can only be set when stream is true")
        return options

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, fmt: dict[str, object] | None) -> dict[str, object] | None:
        if fmt is not None and fmt.get("type") != "text":
            raise ValueError(f"only {{'type': 'text'}} is supported, got {fmt!r}")
        return fmt

    @field_validator("stop")
    @classmethod
    def _stops_non_empty(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        if len(stops) > 16:
            raise ValueError(f"at most 16 stop strings, got {len(stops)}")
        return stop

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids_bounded(cls, ids: list[int] | None) -> list[int] | None:
        if ids is not None and len(ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"at most {MAX_STOP_TOKEN_IDS} stop token ids, got {len(ids)}")
        if ids and min(ids) < 0:
            raise ValueError("token ids must be >= 0")
        return ids

    def stop_strings(self) -> tuple[str, ...]:
        """``stop`` as a tuple."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``: one prompt, as text or as token ids."""

    _NEUTRAL: ClassVar[Mapping[str, tuple[object, ...]]] = {
        **_SamplingFields._NEUTRAL, "logprobs": (), "suffix": ("",),
    }

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _single_prompt(
        cls, prompt: str | list[int] | list[str] | list[list[int]]
    ) -> str | list[int] | list[str] | list[list[int]]:
        if isinstance(prompt, list):
            if not prompt:
                raise ValueError("prompt must not be empty")
            if isinstance(prompt[0], str | list) and len(prompt) != 1:
                raise ValueError(f"only one prompt per request is supported, got {len(prompt)}")
            ids = prompt[0] if isinstance(prompt[0], list) else prompt
            if not ids:
                raise ValueError("prompt must not be empty")
            if isinstance(ids[0], int) and min(ids) < 0:  # type: ignore[type-var]
                raise ValueError("token ids must be >= 0")
        return prompt

    def single_prompt(self) -> str | list[int]:
        """The prompt, unwrapped from a one-element batch."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            return prompt[0]  # type: ignore[return-value]
        return prompt  # type: ignore[return-value]


class TextPart(_Body):
    """A text content part of a chat message."""

    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    """One chat message; list content may only hold text parts."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The content as one string."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``."""

    # Without tools, "none" and "auto" both mean that the model answers in text.
    _NEUTRAL: ClassVar[Mapping[str, tuple[object, ...]]] = {
        **_SamplingFields._NEUTRAL,
        "logprobs": (False,),
        "top_logprobs": (),
        "tools": ([],),
        "tool_choice": ("none", "auto"),
        "functions": ([],),
        "function_call": ("none", "auto"),
        "continue_final_message": (False,),
        "chat_template": (),
        "chat_template_kwargs": ({},),
    }

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    add_generation_prompt: bool = Field(default=True, description="extension; end the prompt with the answer's header")
    # Accepted only at their neutral values (``_NEUTRAL``).
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, object]] | None = None
    tool_choice: str | dict[str, object] | None = None
    functions: list[dict[str, object]] | None = None
    function_call: str | dict[str, object] | None = None
    continue_final_message: bool | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, object] | None = None

    def max_new_tokens(self) -> int | None:
        """``max_completion_tokens`` if given, else the older ``max_tokens``."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
