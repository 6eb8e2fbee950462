"""OpenAI-style error objects and the mapping from failures to HTTP statuses.

Every error leaves the server as ``{"error": {"message", "type", "param",
"code"}}``. Status codes:

- 400 malformed JSON, schema violations and invalid values (like vLLM and
  OpenAI, pdserve does not use 422; ``param`` names the offending field);
- 401 missing or wrong API key; 404 unknown model or route; 405 wrong method;
- 413 prompt longer than the context window, or a body over the size limit;
- 429 admission rejected the request (``Retry-After`` header, whole seconds);
- 503 no instance could generate; 504 the request's deadline passed;
- 500 anything unexpected (the message says what, the server keeps serving).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from orchestrator.runtime.backend import (
    BackendError,
    DeadlineExceeded,
    GenerationFailed,
    InvalidRequest,
    RequestRejected,
)
from orchestrator.runtime.metrics import RequestOutcome


@dataclass(eq=False)
class APIError(Exception):
    """An error the server answers with; ``code`` is a short machine-readable reason."""

    status: int
    message: str
    type: str
    code: str
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        """The OpenAI error object."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @property
    def outcome(self) -> RequestOutcome:
        """How a request ending with this error is counted."""
        if self.status == 429:
            return RequestOutcome.REJECTED
        return RequestOutcome.ERROR if self.status >= 500 else RequestOutcome.INVALID


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    """400: the request is malformed or has an invalid value."""
    return APIError(400, message, "invalid_request_error", code, param)


def unauthorized() -> APIError:
    """401: missing or wrong API key."""
    return APIError(
        401, "Missing or invalid API key: send 'Authorization: Bearer <key>'.",
        "authentication_error", "invalid_api_key",
    )


def model_not_found(model: str, served: str) -> APIError:
    """404: the request names a model this server does not serve."""
    return APIError(
        404, f"The model {model!r} does not exist; this server serves {served!r}.",
        "invalid_request_error", "model_not_found", "model",
    )


def route_error(status: int, path: str, method: str) -> APIError:
    """404/405 for routes that do not exist or do not take this method."""
    if status == 405:
        return APIError(405, f"Method {method} is not allowed on {path}.", "invalid_request_error",
                        "method_not_allowed")
    return APIError(404, f"No route {method} {path}.", "invalid_request_error", "not_found")


def context_too_long(prompt_tokens: int, max_context_tokens: int) -> APIError:
    """413: the prompt alone does not fit the context window."""
    return APIError(
        413,
        f"The prompt has {prompt_tokens} tokens; the model's context window is {max_context_tokens} "
        "tokens and must also hold at least one generated token.",
        "invalid_request_error", "context_length_exceeded", "prompt",
    )


def body_too_large(max_body_bytes: int) -> APIError:
    """413: the request body is over the server's size limit."""
    return APIError(413, f"The request body exceeds this server's limit of {max_body_bytes} bytes.",
                    "invalid_request_error", "request_too_large")


def rejected(reason: str, retry_after_s: float | None) -> APIError:
    """429 with a Retry-After header (whole seconds, at least 1)."""
    retry_s = max(1, math.ceil(retry_after_s)) if retry_after_s is not None else 1
    return APIError(
        429, f"The server is overloaded ({reason}); retry after {retry_s} s.",
        "rate_limit_error", reason, headers={"Retry-After": str(retry_s)},
    )


def from_backend_error(exc: BackendError) -> APIError:
    """Map a backend failure to the HTTP error it is answered with."""
    if isinstance(exc, RequestRejected):
        return rejected(exc.reason, exc.retry_after_s)
    if isinstance(exc, InvalidRequest):
        return APIError(400, str(exc) or "invalid request", "invalid_request_error", "invalid_request")
    if isinstance(exc, DeadlineExceeded):
        return APIError(504, str(exc) or "the request's deadline passed", "timeout_error", "deadline_exceeded")
    if isinstance(exc, GenerationFailed):
        return APIError(503, str(exc) or "no instance could generate", "service_unavailable_error",
                        "generation_failed")
    return APIError(500, f"{type(exc).__name__}: {exc}", "server_error", "internal_error")


def from_validation_error(exc: ValidationError) -> APIError:
    """400 naming the first field pydantic rejected."""
    errors = exc.errors(include_url=False)
    if not errors:
        return bad_request(str(exc))
    first = errors[0]
    param = ".".join(str(p) for p in first.get("loc", ())) or None
    message = first.get("msg", "invalid value")
    if param is not None:
        message = f"{param}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error(s))"
    return bad_request(message, param)


def internal_error(exc: BaseException) -> APIError:
    """500 for an unexpected exception; the server keeps serving."""
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error", "internal_error")
