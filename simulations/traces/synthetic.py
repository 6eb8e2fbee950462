"""Synthetic workloads: Poisson or Gamma arrivals with fixed or empirical lengths.

Arrivals form a renewal process at ``rate_per_s`` whose inter-arrival
coefficient of variation is ``cv`` (``cv == 1`` is Poisson; Gamma with shape
``1/cv**2`` otherwise). The first request arrives at 0. Lengths are either
fixed, or whole (prompt, output) rows drawn with replacement from another
trace, so their correlation survives. Every generator takes a ``seed``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from simulations.traces.trace import Trace


@dataclass(frozen=True)
class LengthSampler:
    """Where request lengths come from: fixed values, or rows of an empirical ``source`` trace."""

    prompt_tokens: int = 1024
    output_tokens: int = 128
    source: Trace | None = None  # when set, (prompt, output) pairs are drawn from its rows

    def __post_init__(self) -> None:
        if self.source is None and (self.prompt_tokens < 1 or self.output_tokens < 1):
            raise ValueError("fixed lengths must be >= 1 token")
        if self.source is not None and len(self.source) == 0:
            raise ValueError("empirical length source trace is empty")

    def sample(self, n: int, rng: np.random.Generator) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Draw ``n`` (prompt, output) length pairs."""
        if self.source is None:
            return np.full(n, self.prompt_tokens, np.int64), np.full(n, self.output_tokens, np.int64)
        rows = rng.integers(0, len(self.source), size=n)
        return self.source.prompt_tokens[rows].copy(), self.source.output_tokens[rows].copy()


def inter_arrival_gaps_s(
    n: int, rate_per_s: float, cv: float, rng: np.random.Generator
) -> npt.NDArray[np.float64]:
    """``n`` renewal gaps with mean ``1/rate_per_s`` and coefficient of variation ``cv``."""
    if rate_per_s <= 0:
        raise ValueError(f"rate_per_s must be > 0, got {rate_per_s}")
    if cv <= 0:
        return np.full(n, 1.0 / rate_per_s)  # cv 0: perfectly regular arrivals
    if cv == 1.0:
        return rng.exponential(1.0 / rate_per_s, size=n)
    shape = 1.0 / (cv * cv)
    return rng.gamma(shape, 1.0 / (rate_per_s * shape), size=n)


def synthetic_trace(
    num_requests: int,
    rate_per_s: float,
    cv: float = 1.0,
    lengths: LengthSampler | None = None,
    seed: int = 0,
    name: str | None = None,
) -> Trace:
    """A trace of ``num_requests`` renewal arrivals (Poisson when ``cv == 1``) with sampled lengths."""
    if num_requests < 0:
        raise ValueError(f"num_requests must be >= 0, got {num_requests}")
    rng = np.random.default_rng(seed)
    gaps = inter_arrival_gaps_s(max(num_requests - 1, 0), rate_per_s, cv, rng)
    arrival_s = np.concatenate([np.zeros(min(num_requests, 1)), np.cumsum(gaps)])
    prompt, output = (lengths or LengthSampler()).sample(num_requests, rng)
    kind = "poisson" if cv == 1.0 else f"gamma-cv{cv:g}"
    return Trace(
        name=name or f"{kind}-{rate_per_s:g}rps",
        arrival_s=arrival_s.astype(np.float64),
        prompt_tokens=prompt,
        output_tokens=output,
    )


def poisson_trace(
    num_requests: int, rate_per_s: float, lengths: LengthSampler | None = None, seed: int = 0
) -> Trace:
    """Poisson arrivals at ``rate_per_s``."""
    return synthetic_trace(num_requests, rate_per_s, 1.0, lengths, seed)


def gamma_trace(
    num_requests: int, rate_per_s: float, cv: float, lengths: LengthSampler | None = None, seed: int = 0
) -> Trace:
    """Gamma renewal arrivals at ``rate_per_s`` with inter-arrival CV ``cv`` (bursty when > 1)."""
    return synthetic_trace(num_requests, rate_per_s, cv, lengths, seed)
