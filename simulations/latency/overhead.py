"""Serving overheads the engine's own step times leave out, and the latency model that adds them.

A profile times ``engine.step()`` alone. A live request also pays, in order:

1. ``request_s`` — before its prompt reaches an engine and after its first
   token leaves one: HTTP, tokenizing, admission and routing, the router's
   gRPC calls (reserve on D, prefill on P) and the first token's way back.
   No instance is busy for it; the simulator delays when the router sees the
   request (``ClusterConfig.request_overhead_s``) and still counts TTFT and
   e2e from the arrival.
2. ``prefill_step_s`` — per engine step that computes prompt tokens: work of
   the prefill worker's loop outside ``step()`` that keeps the instance busy.
3. ``handoff_s`` — per disaggregated request, from the end of its prefill to
   the decode worker taking it up (the router's call to D, D's admission).
   It occupies no instance: a fixed latency of the KV hand-off
   (``LinkConfig.transfer_latency_s``).
4. ``decode_step_s`` — per engine step that runs decodes: the decode
   worker's loop around ``step()``;
5. ``decode_token_s`` — per running request per decode step: streaming its
   token over gRPC to the router and on as SSE, which grows with the batch.
   Both decode terms keep the instance busy: they lengthen every decode step
   (TPOT) and, by making steps slower, queueing under load.

``OverheadLatency`` wraps any ``LatencyModel`` and adds the per-step terms
(a step that has both prefill and decode work pays the larger fixed one, as
the loop runs once per step, plus ``decode_token_s`` per decode in it).
``with_step_overheads`` builds it, keeping the wrapped model's closed form
for decode runs when it has one (so costing runs of decode steps stays
O(1)). ``Overheads`` is stored, optionally, in profile files
(``profile.read_profile``). The hand-off latency applies to KV transfers,
so only where ``kv_bytes_per_token`` > 0.

Calibration (``fit_overheads``): requests are sent one at a time to a live
endpoint (none queues behind another) and the same requests are simulated
from the engine's profile with no overheads (``benchmarks/twin.py`` does
both). Each request decodes at a known batch size ``decode_batch``: 1 alone,
2 beside one long background request. Per request, the live decode phase
(e2e - TTFT) minus the simulated one is ``handoff_s + (output_tokens - 1) *
(decode_step_s + decode_batch * decode_token_s)``. For each batch size the
line in ``output_tokens - 1`` is fitted by the Theil-Sen estimator (median
of pairwise slopes, then the median intercept), which a few requests slowed
by other processes do not drag; the slopes at two batch sizes split into
``decode_step_s`` and ``decode_token_s`` (one batch size: all per step), and
the hand-off is the smallest batch's intercept. The live TTFT minus the
simulated one is request overhead. On a small CPU machine it was 1-3x
larger beside a busy decode worker than alone, so ``request_s`` mixes the
medians of the two groups by ``busy_fraction``: the share of time the
decode worker is busy in the workload the overheads are for (the twin check
takes it from simulating that workload). Requests served one at a time
cannot tell a per-prefill-step cost from a per-request one (each prompt is
one step), so ``prefill_step_s`` is left at 0 by the fit; set it by hand
where a prefill worker's loop is known to cost time.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from simulations.latency.base import BatchShape, LatencyModel

RunFn = Callable[[int, int, int, int], float]


@dataclass(frozen=True, slots=True)
class Overheads:
    """Seconds of serving overhead outside the engine's step; see the module docstring for each."""

    request_s: float = 0.0  # per request, occupies no instance (router sees it this much later)
    handoff_s: float = 0.0  # per disaggregated request, prefill end -> decode side; occupies no instance
    prefill_step_s: float = 0.0  # per step with prompt tokens, occupies the instance
    decode_step_s: float = 0.0  # per step with decodes, occupies the instance
    decode_token_s: float = 0.0  # per running request per step with decodes, occupies the instance

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"overhead {name} must be finite and >= 0, got {value}")

    @property
    def has_step_terms(self) -> bool:
        """Whether any per-step term is non-zero (so the latency model must be wrapped)."""
        return self.prefill_step_s > 0.0 or self.decode_step_s > 0.0 or self.decode_token_s > 0.0


@dataclass(frozen=True, slots=True)
class OverheadLatency:
    """``inner``'s step time plus the per-step overheads of ``overheads`` (request terms are not used here)."""

    inner: LatencyModel
    overheads: Overheads

    def step_time_s(self, shape: BatchShape, tp_degree: int = 1) -> float:
        """Seconds one step of ``shape`` takes: the wrapped model's time plus this step's overhead."""
        if shape.is_empty:
            return 0.0
        base_s = self.inner.step_time_s(shape, tp_degree) + shape.decode_requests * self.overheads.decode_token_s
        o = self.overheads
        if shape.prefill_tokens > 0 and shape.decode_requests > 0:
            return base_s + max(o.prefill_step_s, o.decode_step_s)
        return base_s + (o.prefill_step_s if shape.prefill_tokens > 0 else o.decode_step_s)


@dataclass(frozen=True, slots=True)
class OverheadRunLatency(OverheadLatency):
    """``OverheadLatency`` whose wrapped model costs decode runs in closed form (``run``)."""

    run: RunFn

    def decode_run_time_s(self, decode_requests: int, context_tokens: int, steps: int, tp_degree: int = 1) -> float:
        """Seconds of ``steps`` pure-decode steps: the wrapped model's run plus one overhead per step."""
        if steps <= 0 or decode_requests <= 0:
            return 0.0
        o = self.overheads
        per_step_s = o.decode_step_s + decode_requests * o.decode_token_s
        return float(self.run(decode_requests, context_tokens, steps, tp_degree)) + steps * per_step_s


def with_step_overheads(model: LatencyModel, overheads: Overheads) -> LatencyModel:
    """``model`` with ``overheads``' per-step terms added; ``model`` itself when they are zero."""
    if not overheads.has_step_terms:
        return model
    # Imported here: the closed forms live with the simulator's step costing, which imports this package.
    from simulations.sim.runcost import closed_form_runs

    run = closed_form_runs(model)
    if run is None:
        return OverheadLatency(model, overheads)
    return OverheadRunLatency(model, overheads, run)


# Probe prompts exceed the router's short-prompt limit (they go through P then D); two output
# lengths tell the per-step overhead from the per-request hand-off; every prompt meets both.
PROBE_PROMPT_TOKENS = (128, 256, 512)
PROBE_OUTPUT_TOKENS = (8, 32)
BACKGROUND_PROMPT_TOKENS = 64


@dataclass(frozen=True, slots=True)
class Probe:
    """One request of a calibration probe: when it is sent, its shape, its decode batch."""

    at_s: float
    prompt_tokens: int
    output_tokens: int
    decode_batch: int  # running requests while it decodes, itself included
    background: bool = False  # the long request that keeps the decode worker busy; not fitted


def probe_plan(alone: int, busy: int = 0, spacing_s: float = 1.0, min_decode_step_s: float = 0.010) -> list[Probe]:
    """Requests sent ``spacing_s`` apart so that none queues behind another probe.

    First ``alone`` probes to an idle system (decode batch 1); then, with ``busy`` > 0, one
    long background request and ``busy`` probes beside it (batch 2). The background decode
    outlasts the probes as long as a decode step takes at least ``min_decode_step_s``.
    """
    if alone < 0 or busy < 0 or spacing_s <= 0 or min_decode_step_s <= 0:
        raise ValueError("probe counts must be >= 0, spacing and step time > 0")
    shapes = [(PROBE_PROMPT_TOKENS[i % 3], PROBE_OUTPUT_TOKENS[i % 2], 1 if i < alone else 2, False)
              for i in range(alone + busy)]
    if busy:
        tokens = round((busy + 1) * spacing_s / min_decode_step_s)
        shapes.insert(alone, (BACKGROUND_PROMPT_TOKENS, tokens, 1, True))
    return [Probe(i * spacing_s, prompt, output, batch, bg) for i, (prompt, output, batch, bg) in enumerate(shapes)]


@dataclass(frozen=True, slots=True)
class IdleSample:
    """One request served with nothing queued ahead: live and simulated (no overheads) seconds from arrival."""

    output_tokens: int
    live_ttft_s: float
    live_e2e_s: float
    sim_ttft_s: float
    sim_e2e_s: float
    decode_batch: int = 1  # running requests while it decoded (itself included)


def _theil_sen(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(intercept, slope) >= 0 of extra seconds against decode steps; all per step when steps do not vary."""
    slopes = [(e2 - e1) / (x2 - x1) for i, (x1, e1) in enumerate(points) for x2, e2 in points[i + 1:] if x2 != x1]
    if slopes:
        slope = max(0.0, statistics.median(slopes))
        intercept = statistics.median(e - slope * x for x, e in points)
        if intercept >= 0.0:
            return intercept, slope
        # No hand-off cost: the line goes through the origin.
        return 0.0, max(0.0, statistics.median(e / x for x, e in points if x > 0))
    if points[0][0] > 0:  # one output length: the steps cannot be told from the hand-off
        return 0.0, max(0.0, statistics.median(e / x for x, e in points))
    return max(0.0, statistics.median(e for _, e in points)), 0.0  # single-token outputs: no decode steps


def fit_overheads(samples: Sequence[IdleSample], busy_fraction: float = 1.0) -> Overheads:
    """Request, hand-off and decode overheads from requests served one at a time (see the module docstring).

    ``busy_fraction`` in [0, 1] weighs the request overhead seen beside a busy decode worker
    against the one seen alone (it has no effect when the samples have one batch size).
    """
    if not samples:
        raise ValueError("fitting overheads needs at least one request served alone")
    if min(s.decode_batch for s in samples) < 1:
        raise ValueError("decode_batch must be >= 1")
    if not 0.0 <= busy_fraction <= 1.0:
        raise ValueError(f"busy_fraction must be in [0, 1], got {busy_fraction}")
    by_batch: dict[int, list[IdleSample]] = {}
    for sample in samples:
        by_batch.setdefault(sample.decode_batch, []).append(sample)
    lines = {
        batch: _theil_sen([(s.output_tokens - 1, (s.live_e2e_s - s.live_ttft_s) - (s.sim_e2e_s - s.sim_ttft_s))
                           for s in group])
        for batch, group in by_batch.items()
    }
    low, high = min(lines), max(lines)
    handoff_s = lines[low][0]
    # Per-step seconds at batch b: decode_step_s + b * decode_token_s, through the two extreme batches.
    token_s = max(0.0, (lines[high][1] - lines[low][1]) / (high - low)) if high > low else 0.0
    step_s = max(0.0, lines[low][1] - low * token_s)
    alone_s, busy_s = (statistics.median(s.live_ttft_s - s.sim_ttft_s for s in by_batch[b]) for b in (low, high))
    request_s = max(0.0, (1.0 - busy_fraction) * alone_s + busy_fraction * busy_s)
    return Overheads(request_s=request_s, handoff_s=handoff_s, decode_step_s=step_s, decode_token_s=token_s)
