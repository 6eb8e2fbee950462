"""From a trace's columns to the requests a benchmark sends (pure, deterministic).

Arrivals keep the trace's shape: rows before ``start_s`` (seconds after the
trace's first arrival) are skipped, times are shifted to start at zero and
divided by ``rate_scale`` (2.0 sends twice as fast), then ``limit`` rows are
kept. Lengths are clipped for small models: the output to
``max_output_tokens``, the prompt to ``max_prompt_tokens`` and, when the
server's context window is known, so that prompt plus output fit in it.
Prompts are synthesised as token ids (exact lengths, no tokenizer needed),
drawn from ``[id_low, id_high)`` with a per-request seed, so repeated runs
send the same requests.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class WorkloadOptions:
    """How to turn a trace into benchmark requests (see the module docstring)."""

    rate_scale: float = 1.0
    start_s: float = 0.0
    limit: int | None = None
    max_prompt_tokens: int | None = None
    max_output_tokens: int | None = None
    context_tokens: int | None = None
    seed: int = 0
    id_low: int = 1000
    id_high: int = 10000

    def __post_init__(self) -> None:
        if self.rate_scale <= 0:
            raise ValueError(f"rate_scale must be > 0, got {self.rate_scale}")
        if self.start_s < 0:
            raise ValueError(f"start_s must be >= 0, got {self.start_s}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        for name in ("max_prompt_tokens", "max_output_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.context_tokens is not None and self.context_tokens < 2:
            raise ValueError(f"context_tokens must be >= 2, got {self.context_tokens}")
        if not 0 <= self.id_low < self.id_high:
            raise ValueError(f"need 0 <= id_low < id_high, got {self.id_low}, {self.id_high}")


@dataclass(frozen=True, slots=True)
class BenchRequest:
    """One request to send: when (seconds after the run starts), how long a prompt, how many tokens."""

    index: int
    send_at_s: float
    prompt_tokens: int
    max_tokens: int
    trace_prompt_tokens: int
    trace_output_tokens: int


def _clip(prompt_tokens: int, output_tokens: int, options: WorkloadOptions) -> tuple[int, int]:
    out = max(1, output_tokens)
    if options.max_output_tokens is not None:
        out = min(out, options.max_output_tokens)
    prompt = max(1, prompt_tokens)
    if options.max_prompt_tokens is not None:
        prompt = min(prompt, options.max_prompt_tokens)
    if options.context_tokens is not None:
        out = min(out, options.context_tokens - 1)
        prompt = min(prompt, options.context_tokens - out)
    return prompt, out


def plan_requests(
    arrival_s: Sequence[float], prompt_tokens: Sequence[int], output_tokens: Sequence[int], options: WorkloadOptions
) -> list[BenchRequest]:
    """The requests to send for a trace's columns (sorted by arrival)."""
    if not len(arrival_s) == len(prompt_tokens) == len(output_tokens):
        raise ValueError("trace columns have different lengths")
    if not len(arrival_s):
        return []
    first_s = float(arrival_s[0]) + options.start_s
    planned: list[BenchRequest] = []
    origin_s: float | None = None
    for row, at_s in enumerate(arrival_s):
        at = float(at_s)
        if at < first_s:
            continue
        if origin_s is None:
            origin_s = at
        prompt, out = _clip(int(prompt_tokens[row]), int(output_tokens[row]), options)
        planned.append(
            BenchRequest(
                index=len(planned),
                send_at_s=(at - origin_s) / options.rate_scale,
                prompt_tokens=prompt,
                max_tokens=out,
                trace_prompt_tokens=int(prompt_tokens[row]),
                trace_output_tokens=int(output_tokens[row]),
            )
        )
        if options.limit is not None and len(planned) >= options.limit:
            break
    return planned


def prompt_ids(request: BenchRequest, options: WorkloadOptions) -> list[int]:
    """The synthetic prompt of ``request``: ``prompt_tokens`` ids, the same on every run."""
    rng = random.Random(options.seed * 1_000_003 + request.index)
    return [rng.randrange(options.id_low, options.id_high) for _ in range(request.prompt_tokens)]
