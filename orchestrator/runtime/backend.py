"""The boundary between the HTTP front end and whatever generates tokens.

The front end turns an OpenAI request into a ``GenerationRequest`` and
consumes ``TokenEvent``s from a ``GenerationBackend``. Two implementations:
an in-process one over a local engine (tests, development) and the
disaggregated one that routes through the controller's snapshot to prefill
and decode workers over gRPC. Every stream ends with a finished event or one
of the errors below; a backend never leaves a stream hanging past its deadline.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from workers.engine.sampling_params import SamplingParams


class FinishReason(str, Enum):
    """Why a stream ended normally (OpenAI's ``finish_reason``)."""

    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens reached
    ABORT = "abort"  # client went away or the request was cancelled


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """A tokenized request with its sampling, SLO class and absolute deadline."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    arrival_s: float
    deadline_s: float
    slo_class: str = "default"


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """New tokens (and their text) of one request; the last one has ``finish_reason`` set."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # cumulative


class BackendError(Exception):
    """Base of the errors a backend raises instead of finishing a stream."""


class RequestRejected(BackendError):
    """Admission said no; ``retry_after_s`` becomes HTTP Retry-After."""

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


class InvalidRequest(BackendError):
    """The request can never succeed as given (e.g. longer than the context window)."""


class GenerationFailed(BackendError):
    """No healthy instance could finish the request; the message says what failed."""


class DeadlineExceeded(BackendError):
    """The request's deadline passed before it finished."""


class GenerationBackend(Protocol):
    """Produces a request's tokens as an async stream."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Stream ``request``'s tokens; raises a ``BackendError`` instead of finishing."""
        ...

    async def abort(self, request_id: str) -> None:
        """Stop ``request_id`` everywhere it runs and free its resources."""
        ...

    def readiness(self) -> str | None:
        """Why no request could be served now (``GET /ready`` answers 503 with it); None when one could."""
        ...
