"""What the engine hands back, and the errors it raises for bad input."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class FinishReason(str, Enum):
    """Why a request ended (values match OpenAI's ``finish_reason``)."""

    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context window reached
    ABORT = "abort"  # aborted by the caller
    PREFILLED = (
        "prefilled"  # prefill-only engine: prompt done and first token sampled; decode continues elsewhere
    )


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """New tokens (and text) of one request in one step; the last one has ``finished`` set."""

    request_id: str
    new_token_ids: tuple[int, ...]
    new_text: str
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int  # cumulative


@dataclass(frozen=True, slots=True)
class CompletionResult:
    """A whole finished request, as returned by ``LLMEngine.generate``."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason


@dataclass(frozen=True, slots=True)
class EngineStats:
    """Load of one engine, for load reports and routing."""

    free_blocks: int
    total_blocks: int
    num_running: int
    num_waiting: int
    num_reserved: int
    queued_prefill_tokens: int


class InvalidRequest(ValueError):
    """A request that can never be served as given; the message says which field and why."""


class PromptTooLong(InvalidRequest):
    """The prompt (plus tokens already generated) leaves no room in the context window."""


class DuplicateRequest(InvalidRequest):
    """The request id is already in use in this engine."""


class UnknownRequest(LookupError):
    """No request with this id is known to the engine."""


class WrongRole(InvalidRequest):
    """The call is not served by an engine of this role."""
