"""Per-phase linear regression latency model, fitted by least squares on profile samples.

    prefill(s) = a_p + b_p * Σlen + c_p * Σlen²     (shape.prefill_tokens, shape.prefill_tokens_sq)
    decode(s)  = a_d + b_d * Σcontext + c_d * batch  (shape.decode_context_tokens, shape.decode_requests)

A mixed (chunked-prefill) step runs both parts in one forward pass, so it
pays the fixed per-step cost once: ``prefill + decode - min(a_p, a_d)``.
(The smaller intercept is removed so a mixed step never costs less than
either part alone.) Tensor parallelism follows ``tp.TpScaling``: intercepts
stay, the token terms are divided by ``tp``, all-reduce terms are added.

Fitting keeps every coefficient >= 0: a coefficient the unconstrained fit
makes negative is pinned at 0 and the rest refitted, so predictions never go
negative outside the profiled range. R² is reported per phase.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from simulations.latency.base import BatchShape
from simulations.latency.tp import TpScaling


@dataclass(frozen=True, slots=True)
class PrefillSample:
    """One measured prefill step: Σ prompt lengths, Σ lengths², seconds."""

    tokens: int
    tokens_sq: int
    seconds: float


@dataclass(frozen=True, slots=True)
class DecodeSample:
    """One measured decode step: running requests, Σ their context lengths, seconds."""

    batch: int
    context: int
    seconds: float


@dataclass(frozen=True, slots=True)
class RegressionLatency:
    """Step time from per-phase linear terms; see the module docstring for the formula."""

    prefill_fixed_s: float
    prefill_s_per_token: float
    prefill_s_per_token_sq: float
    decode_fixed_s: float
    decode_s_per_context_token: float
    decode_s_per_request: float
    tp: TpScaling = field(default_factory=TpScaling)

    def step_time_s(self, shape: BatchShape, tp_degree: int = 1) -> float:
        """Seconds one step of ``shape`` takes with tensor parallelism ``tp_degree``."""
        if shape.is_empty:
            return 0.0
        overhead_s = 0.0
        work_s = 0.0
        if shape.prefill_tokens > 0:
            overhead_s += self.prefill_fixed_s
            work_s += self.prefill_s_per_token * shape.prefill_tokens
            work_s += self.prefill_s_per_token_sq * shape.prefill_tokens_sq
        if shape.decode_requests > 0:
            overhead_s += self.decode_fixed_s
            work_s += self.decode_s_per_context_token * shape.decode_context_tokens
            work_s += self.decode_s_per_request * shape.decode_requests
        if shape.prefill_tokens > 0 and shape.decode_requests > 0:
            overhead_s -= min(self.prefill_fixed_s, self.decode_fixed_s)
        tokens = shape.prefill_tokens + shape.decode_requests
        return self.tp.step_time_s(overhead_s, work_s, tokens, tp_degree)


@dataclass(frozen=True)
class RegressionFit:
    """A fitted model with its per-phase goodness of fit."""

    model: RegressionLatency
    prefill_r2: float
    decode_r2: float


def r_squared(y: npt.NDArray[np.float64], y_hat: npt.NDArray[np.float64]) -> float:
    """Coefficient of determination; 1.0 when ``y`` is constant and predicted exactly."""
    ss_res = float(np.sum((y - y_hat) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    if ss_tot == 0.0:
        return 1.0 if ss_res == 0.0 else 0.0
    return 1.0 - ss_res / ss_tot


def nonnegative_lstsq(x: npt.NDArray[np.float64], y: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Least squares with coefficients >= 0 (drop the most negative column and refit until none is)."""
    active = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    # Scale columns so lstsq is well conditioned when Σlen² is 1e8 times Σlen.
    scale = np.maximum(np.abs(x).max(axis=0), 1e-300)
    while active:
        sol, *_ = np.linalg.lstsq(x[:, active] / scale[active], y, rcond=None)
        sol = sol / scale[active]
        if np.all(sol >= 0):
            coef[:] = 0.0
            coef[active] = sol
            return coef
        active.pop(int(np.argmin(sol)))
    return coef


def _fit_phase(
    x: npt.NDArray[np.float64], y: npt.NDArray[np.float64], phase: str
) -> tuple[npt.NDArray[np.float64], float]:
    if len(y) == 0:
        raise ValueError(f"no {phase} samples to fit")
    if np.any(y < 0) or not np.all(np.isfinite(y)):
        raise ValueError(f"{phase} samples must have finite seconds >= 0")
    coef = nonnegative_lstsq(x, y)
    return coef, r_squared(y, x @ coef)


def fit_regression(
    prefill: Sequence[PrefillSample], decode: Sequence[DecodeSample], tp: TpScaling | None = None
) -> RegressionFit:
    """Fit both phases by non-negative least squares and report R² per phase."""
    px = np.array([[1.0, s.tokens, s.tokens_sq] for s in prefill], dtype=np.float64).reshape(-1, 3)
    py = np.array([s.seconds for s in prefill], dtype=np.float64)
    dx = np.array([[1.0, s.context, s.batch] for s in decode], dtype=np.float64).reshape(-1, 3)
    dy = np.array([s.seconds for s in decode], dtype=np.float64)
    pc, pr2 = _fit_phase(px, py, "prefill")
    dc, dr2 = _fit_phase(dx, dy, "decode")
    model = RegressionLatency(
        prefill_fixed_s=float(pc[0]),
        prefill_s_per_token=float(pc[1]),
        prefill_s_per_token_sq=float(pc[2]),
        decode_fixed_s=float(dc[0]),
        decode_s_per_context_token=float(dc[1]),
        decode_s_per_request=float(dc[2]),
        tp=tp or TpScaling(),
    )
    return RegressionFit(model=model, prefill_r2=pr2, decode_r2=dr2)
