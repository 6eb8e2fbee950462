"""What the HTTP front end needs besides a backend: limits, a tokenizer, a clock."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

DEFAULT_SLO_CLASS = "default"  # the class of a request without an x-pdserve-slo-class header


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Limits the front end enforces before a request reaches the backend.

    ``max_context_tokens``: prompt plus generated tokens may not exceed it; a
    prompt that alone fills it is answered 413, a ``max_tokens`` that does not
    fit is answered 400.
    ``default_max_tokens``: chat requests without ``max_tokens`` generate up to
    this many tokens (``None``: until the context window is full, like OpenAI).
    ``max_concurrent_requests``: requests in flight beyond this are answered 429
    with ``Retry-After: retry_after_s`` (``None``: no limit; the backend's own
    admission still applies).
    ``default_timeout_s`` / ``max_timeout_s``: a request's deadline after
    arrival, and the most a client may ask for with ``x-pdserve-timeout-s``.
    ``max_body_bytes``: a larger request body is answered 413 before it is
    read whole (the default, 16 MiB, is far more text than any context window).
    ``slo_classes``: the names ``x-pdserve-slo-class`` may carry; any other is
    answered 400, because each class is a label set in the latency histograms
    and a free-form header would grow them without bound.
    """

    max_context_tokens: int = 2048
    default_max_tokens: int | None = None
    max_concurrent_requests: int | None = None
    retry_after_s: float = 1.0
    default_timeout_s: float = 600.0
    max_timeout_s: float = 3600.0
    max_body_bytes: int = 16 << 20
    slo_classes: frozenset[str] = frozenset({DEFAULT_SLO_CLASS})

    def __post_init__(self) -> None:
        if DEFAULT_SLO_CLASS not in self.slo_classes or not all(self.slo_classes):
            raise ValueError(f"slo_classes must hold {DEFAULT_SLO_CLASS!r} and no empty name, got "
                             f"{sorted(self.slo_classes)}")
        if self.max_context_tokens < 2:
            raise ValueError(f"max_context_tokens must be >= 2, got {self.max_context_tokens}")
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")
        if self.default_max_tokens is not None and self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be >= 1, got {self.default_max_tokens}")
        if self.max_concurrent_requests is not None and self.max_concurrent_requests < 1:
            raise ValueError(f"max_concurrent_requests must be >= 1, got {self.max_concurrent_requests}")
        if not 0 < self.default_timeout_s <= self.max_timeout_s:
            raise ValueError(
                f"need 0 < default_timeout_s <= max_timeout_s, got {self.default_timeout_s}, {self.max_timeout_s}"
            )


class PromptTokenizer(Protocol):
    """The tokenizer surface the front end uses (text in; generated text comes from the backend)."""

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template from ``tokenizer_config.json``, if any."""
        ...

    @property
    def bos_token(self) -> str | None:
        """Beginning-of-sequence token text, for chat templates."""
        ...

    @property
    def eos_token(self) -> str | None:
        """End-of-sequence token text, for chat templates."""
        ...

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer knows (added tokens included); prompt ids must be below it."""
        ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``."""
        ...


class WallClock:
    """Seconds since the Unix epoch, so deadlines mean the same in every process."""

    def now_s(self) -> float:
        """The current wall-clock time."""
        return time.time()
