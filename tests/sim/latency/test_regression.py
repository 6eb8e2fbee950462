"""The regression model: fitting recovers known coefficients; mixed steps and TP follow the documented rules."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from simulations.latency import (
    BatchShape,
    DecodeSample,
    FixedLatency,
    PrefillSample,
    RegressionLatency,
    TpScaling,
    ZeroLatency,
    fit_regression,
)

TRUE = RegressionLatency(
    prefill_fixed_s=0.004,
    prefill_s_per_token=2e-5,
    prefill_s_per_token_sq=3e-9,
    decode_fixed_s=0.006,
    decode_s_per_context_token=4e-8,
    decode_s_per_request=2e-4,
)


def _samples(noise: float, seed: int = 0) -> tuple[list[PrefillSample], list[DecodeSample]]:
    rng = np.random.default_rng(seed)
    prefill = []
    for length in (16, 64, 128, 256, 512, 1024, 2048, 4096):
        for n in (1, 2):
            shape = BatchShape(
                prefill_tokens=n * length, prefill_tokens_sq=n * length * length, prefill_requests=n
            )
            t = TRUE.step_time_s(shape) * (1 + noise * rng.standard_normal())
            prefill.append(PrefillSample(shape.prefill_tokens, shape.prefill_tokens_sq, t))
    decode = []
    for batch in (1, 4, 16, 64):
        for ctx in (64, 512, 2048):
            shape = BatchShape(decode_requests=batch, decode_context_tokens=batch * ctx)
            t = TRUE.step_time_s(shape) * (1 + noise * rng.standard_normal())
            decode.append(DecodeSample(batch, batch * ctx, t))
    return prefill, decode


def test_fit_recovers_exact_coefficients() -> None:
    fit = fit_regression(*_samples(noise=0.0))
    m = fit.model
    for name in (
        "prefill_fixed_s",
        "prefill_s_per_token",
        "prefill_s_per_token_sq",
        "decode_fixed_s",
        "decode_s_per_context_token",
        "decode_s_per_request",
    ):
        assert getattr(m, name) == pytest.approx(getattr(TRUE, name), rel=1e-6), name
    assert fit.prefill_r2 == pytest.approx(1.0) and fit.decode_r2 == pytest.approx(1.0)


def test_fit_with_noise_is_close_and_r2_below_one() -> None:
    fit = fit_regression(*_samples(noise=0.03, seed=1))
    assert fit.model.prefill_s_per_token_sq == pytest.approx(TRUE.prefill_s_per_token_sq, rel=0.1)
    assert fit.model.decode_s_per_request == pytest.approx(TRUE.decode_s_per_request, rel=0.1)
    assert 0.95 < fit.prefill_r2 < 1.0 and 0.9 < fit.decode_r2 < 1.0


def test_fit_keeps_coefficients_nonnegative() -> None:
    # Times fall with length: the unconstrained slope would be negative.
    prefill = [PrefillSample(n, n * n, 0.01 - 1e-6 * n) for n in (10, 100, 1000)]
    decode = [DecodeSample(b, b * 10, 0.01) for b in (1, 2, 4)]
    m = fit_regression(prefill, decode).model
    assert min(m.prefill_fixed_s, m.prefill_s_per_token, m.prefill_s_per_token_sq) >= 0
    assert (
        m.step_time_s(BatchShape(prefill_tokens=100_000, prefill_tokens_sq=10**10, prefill_requests=1)) >= 0
    )


def test_fit_rejects_empty_and_negative() -> None:
    with pytest.raises(ValueError, match="prefill"):
        fit_regression([], [DecodeSample(1, 1, 0.1)])
    with pytest.raises(ValueError, match="decode"):
        fit_regression([PrefillSample(1, 1, 0.1)], [DecodeSample(1, 1, -0.1)])


def test_mixed_step_shares_one_overhead() -> None:
    prefill = BatchShape(prefill_tokens=512, prefill_tokens_sq=512 * 512, prefill_requests=1)
    decode = BatchShape(decode_requests=8, decode_context_tokens=8000)
    mixed = BatchShape(512, 512 * 512, 1, 8, 8000)
    expected = (
        TRUE.step_time_s(prefill) + TRUE.step_time_s(decode) - min(TRUE.prefill_fixed_s, TRUE.decode_fixed_s)
    )
    assert TRUE.step_time_s(mixed) == pytest.approx(expected)
    assert TRUE.step_time_s(mixed) > max(TRUE.step_time_s(prefill), TRUE.step_time_s(decode))
    assert TRUE.step_time_s(BatchShape()) == 0.0


def test_tp_divides_work_and_adds_comm() -> None:
    shape = BatchShape(prefill_tokens=4096, prefill_tokens_sq=4096**2, prefill_requests=1)
    ideal = TRUE.step_time_s(shape, tp_degree=2)
    work = TRUE.step_time_s(shape) - TRUE.prefill_fixed_s
    assert ideal == pytest.approx(TRUE.prefill_fixed_s + work / 2)
    comm = TpScaling(comm_fixed_s=1e-3, comm_s_per_token=1e-7)
    with_comm = dataclasses.replace(TRUE, tp=comm)
    t4 = with_comm.step_time_s(shape, tp_degree=4)
    assert t4 == pytest.approx(TRUE.prefill_fixed_s + work / 4 + 1e-3 + 1e-7 * 4096 * 1.5)
    with pytest.raises(ValueError):
        TRUE.step_time_s(shape, tp_degree=0)


def test_trivial_models() -> None:
    busy = BatchShape(decode_requests=3, decode_context_tokens=30)
    assert ZeroLatency().step_time_s(busy) == 0.0
    assert FixedLatency(0.02).step_time_s(busy, tp_degree=4) == 0.02
    assert FixedLatency(0.02).step_time_s(BatchShape()) == 0.0
    with pytest.raises(ValueError):
        FixedLatency(-1.0)
