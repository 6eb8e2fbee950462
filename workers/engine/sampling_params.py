"""Per-request sampling parameters, validated where they are built."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# temperatures below this sample as greedy: dividing logits by a smaller one overflows float32 to inf
# (1e-40 reaches the sampler as a valid number), and its distribution is argmax anyway
GREEDY_BELOW_TEMPERATURE = 1e-5


class InvalidSamplingParams(ValueError):
    """A sampling parameter is out of its valid range; the message names it."""


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens and when to stop; ``temperature == 0`` means greedy."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for name in ("max_tokens", "top_k"):
            _require_int(name, getattr(self, name))
        if self.seed is not None:
            _require_int("seed", self.seed)
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise InvalidSamplingParams(f"{name} must be a finite number, got {value!r}")
        if self.max_tokens < 1:
            raise InvalidSamplingParams(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise InvalidSamplingParams(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidSamplingParams(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidSamplingParams(f"top_k must be >= 0, got {self.top_k}")
        for token in self.stop_token_ids:
            _require_int("stop_token_ids", token)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidSamplingParams(f"stop strings must be non-empty strings, got {list(self.stop)!r}")

    @property
    def greedy(self) -> bool:
        """Whether sampling reduces to argmax (``temperature`` below ``GREEDY_BELOW_TEMPERATURE``, or ``top_k == 1``)."""
        return self.temperature < GREEDY_BELOW_TEMPERATURE or self.top_k == 1


def _require_int(name: str, value: object) -> None:
    """Refuse a non-integer (a float such as 2.0 or a bool too): it would fail later, inside a batch's step."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidSamplingParams(f"{name} must be an integer, got {value!r}")
