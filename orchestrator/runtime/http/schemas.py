"""Request bodies of the OpenAI API subset pdserve serves, validated with pydantic.

Unknown fields are ignored (clients send many optional ones as null); the
fields pdserve cannot honour (``n > 1``, ``best_of > 1``, ``logprobs``,
``echo``, ``suffix``, ``tools``, non-zero ``presence_penalty`` /
``frequency_penalty``, a non-empty ``logit_bias``, a chat ``response_format``
other than text, several prompts in one request) are rejected with a 400
naming the field rather than silently ignored. Extensions beyond OpenAI:
``top_k`` and ``ignore_eos``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


class StreamOptions(BaseModel):
    """``stream_options``: only ``include_usage`` is supported."""

    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _SamplingFields(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1, description="extension; 0 or -1 disables top-k")
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX, description="a signed 64-bit integer")
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None
    ignore_eos: bool = Field(default=False, description="extension; keep generating past EOS")
    # Accepted only at their neutral values, so that a client relying on them hears it is not honoured.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"only n=1 is supported, got {n}")
        return n

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalties(cls, penalty: float | None) -> float | None:
        if penalty:
            raise ValueError(f"only 0 is supported, got {penalty}")
        return penalty

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        if bias:
            raise ValueError("logit_bias is not supported")
        return bias

    @field_validator("stop")
    @classmethod
    def _stops_non_empty(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        if len(stops) > 16:
            raise ValueError(f"at most 16 stop strings, got {len(stops)}")
        return stop

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

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

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

    # Field validators (not one model validator) so that the 400's ``param`` names the field.
    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool) -> bool:
        if echo:
            raise ValueError("echo is not supported")
        return echo

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, logprobs: int | None) -> int | None:
        if logprobs is not None:
            raise ValueError("logprobs is not supported")
        return logprobs

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix: str | None) -> str | None:
        if suffix:
            raise ValueError("suffix is not supported")
        return suffix

    @field_validator("best_of")
    @classmethod
    def _one_candidate(cls, best_of: int | None) -> int | None:
        if best_of is not None and best_of != 1:
            raise ValueError(f"only best_of=1 is supported, got {best_of}")
        return best_of

    def single_prompt(self) -> str | list[int]:
        """The prompt, unwrapped from a one-element batch."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            return prompt[0]  # type: ignore[return-value]
        return prompt  # type: ignore[return-value]


class TextPart(BaseModel):
    """A text content part of a chat message."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One chat message; list content may only hold text parts."""

    model_config = ConfigDict(extra="ignore")
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

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    tools: list[dict[str, object]] | None = None
    response_format: dict[str, object] | None = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, logprobs: bool | None) -> bool | None:
        if logprobs:
            raise ValueError("logprobs is not supported")
        return logprobs

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, fmt: dict[str, object] | None) -> dict[str, object] | None:
        # JSON modes would need constrained decoding, which the engine does not do.
        if fmt is not None and fmt.get("type") != "text":
            raise ValueError(f"only {{'type': 'text'}} is supported, got {fmt!r}")
        return fmt

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, tools: list[dict[str, object]] | None) -> list[dict[str, object]] | None:
        if tools:
            raise ValueError("tools are not supported")
        return tools

    def max_new_tokens(self) -> int | None:
        """``max_completion_tokens`` if given, else the older ``max_tokens``."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
