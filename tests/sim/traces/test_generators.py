"""Synthetic arrivals, ServeGen sampling and the trace transformations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from simulations.traces import (
    LengthSampler,
    Trace,
    gamma_trace,
    generate_servegen,
    head,
    load_trace,
    poisson_trace,
    sample_rows,
    scale_rate,
    tile,
    time_window,
)


def _cv(trace: Trace) -> float:
    gaps = np.diff(trace.arrival_s)
    return float(gaps.std() / gaps.mean())


def test_poisson_rate_cv_and_seed() -> None:
    a = poisson_trace(20_000, rate_per_s=50.0, seed=3)
    assert len(a) == 20_000 and a.arrival_s[0] == 0.0
    assert len(a) / a.duration_s == pytest.approx(50.0, rel=0.03)
    assert _cv(a) == pytest.approx(1.0, abs=0.03)
    assert np.array_equal(a.arrival_s, poisson_trace(20_000, 50.0, seed=3).arrival_s)
    assert not np.array_equal(a.arrival_s, poisson_trace(20_000, 50.0, seed=4).arrival_s)
    assert set(a.prompt_tokens.tolist()) == {1024} and set(a.output_tokens.tolist()) == {128}


@pytest.mark.parametrize("cv", [0.5, 3.0])
def test_gamma_cv(cv: float) -> None:
    trace = gamma_trace(50_000, rate_per_s=10.0, cv=cv, seed=1)
    assert _cv(trace) == pytest.approx(cv, rel=0.08)
    assert len(trace) / trace.duration_s == pytest.approx(10.0, rel=0.08)


def test_empirical_lengths_come_from_source_rows(data_dir: Path) -> None:
    source = load_trace(data_dir / "azure_conv_head40.csv")
    trace = poisson_trace(2_000, 5.0, LengthSampler(source=source), seed=2)
    pairs = set(zip(source.prompt_tokens.tolist(), source.output_tokens.tolist(), strict=True))
    drawn = set(zip(trace.prompt_tokens.tolist(), trace.output_tokens.tolist(), strict=True))
    assert drawn <= pairs and len(drawn) > 30


def test_fixed_lengths_validated() -> None:
    with pytest.raises(ValueError):
        LengthSampler(prompt_tokens=0)
    with pytest.raises(ValueError, match="rate"):
        poisson_trace(10, 0.0)


def test_scale_window_head_sample(data_dir: Path) -> None:
    trace = load_trace(data_dir / "mooncake_conv_head25.jsonl")
    fast = scale_rate(trace, 4.0)
    np.testing.assert_allclose(fast.arrival_s * 4.0, trace.arrival_s)
    assert fast.hash_ids == trace.hash_ids
    with pytest.raises(ValueError):
        scale_rate(trace, 0.0)
    azure = load_trace(data_dir / "azure_conv_head40.csv")
    window = time_window(azure, 5.0, 10.0)
    expected = (azure.arrival_s >= 5.0) & (azure.arrival_s < 10.0)
    assert len(window) == int(expected.sum()) > 0
    np.testing.assert_allclose(window.arrival_s, azure.arrival_s[expected] - 5.0)
    assert head(azure, 7).prompt_tokens.tolist() == azure.prompt_tokens[:7].tolist()
    sub = sample_rows(azure, num_requests=10, seed=5)
    assert len(sub) == 10 and bool(np.all(np.diff(sub.arrival_s) >= 0))
    assert set(sub.prompt_tokens.tolist()) <= set(azure.prompt_tokens.tolist())
    assert sample_rows(azure, num_requests=10, seed=5).arrival_s.tolist() == sub.arrival_s.tolist()
    assert len(sample_rows(azure, fraction=0.5)) == 20
    with pytest.raises(ValueError):
        sample_rows(azure, num_requests=41)


def test_tile_back_to_back_then_rate_scale(data_dir: Path) -> None:
    base = load_trace(data_dir / "azure_conv_head40.csv")
    tiled = tile(base, 100)
    assert len(tiled) == 100
    assert tiled.prompt_tokens[40:80].tolist() == base.prompt_tokens.tolist()
    gap = base.duration_s / 39
    assert tiled.arrival_s[40] == pytest.approx(base.duration_s + gap)
    np.testing.assert_allclose(tiled.arrival_s[40:80] - tiled.arrival_s[40], base.arrival_s)
    assert bool(np.all(np.diff(tiled.arrival_s) >= 0))
    rate = len(base) / base.duration_s
    scaled = scale_rate(tile(base, 4_000), 10.0)
    assert len(scaled) / scaled.duration_s == pytest.approx(10 * rate, rel=0.05)


def test_tile_shifts_hash_ids(data_dir: Path) -> None:
    base = load_trace(data_dir / "mooncake_conv_head25.jsonl")
    assert base.hash_ids is not None
    tiled = tile(base, 60)
    assert tiled.hash_ids is not None and len(tiled.hash_ids) == 60
    first = {h for row in tiled.hash_ids[:25] for h in row}
    second = {h for row in tiled.hash_ids[25:50] for h in row}
    assert not first & second
    assert tile(base, 30, distinct_hash_ids=False).hash_ids[25] == base.hash_ids[0]  # type: ignore[index]


def test_tile_azure_conv_to_one_million(shared_traces: Path) -> None:
    trace = scale_rate(tile(load_trace("azure-conv"), 1_000_000), 20.0)
    assert len(trace) == 1_000_000
    assert trace.output_tokens[-1] == load_trace("azure-conv").output_tokens[1_000_000 % 19_366 - 1]


def test_servegen_sample_counts_and_lengths(data_dir: Path) -> None:
    folder = data_dir / "servegen_sample"
    trace = generate_servegen(folder, seed=1)
    # expected requests: client 0 (2+1+3+0.5)*600 = 3900, client 1 (1+1+2)*600 = 2400
    assert len(trace) == pytest.approx(6_300, rel=0.1)
    assert trace.arrival_s.max() < 3600
    in_first = trace.arrival_s < 600  # only client 1 (no dataset: fallback lengths)
    assert set(trace.prompt_tokens[in_first].tolist()) == {1024}
    client0 = generate_servegen(folder, seed=1, client_ids=(0,))
    early = (client0.arrival_s >= 600) & (client0.arrival_s < 1200)
    assert set(client0.prompt_tokens[early].tolist()) == {100, 300}
    # step 1800 is empty: rows in [1800, 2700) keep using step 0's PDFs
    mid = (client0.arrival_s >= 1800) & (client0.arrival_s < 2400)
    assert set(client0.prompt_tokens[mid].tolist()) == {100, 300}
    late = client0.arrival_s >= 3000  # step 2700
    assert set(client0.prompt_tokens[late].tolist()) == {2000}
    assert set(client0.output_tokens[late].tolist()) == {50, 70}
    again = generate_servegen(folder, seed=1)
    assert np.array_equal(again.arrival_s, trace.arrival_s)


def test_servegen_window_rate_and_cv(data_dir: Path) -> None:
    folder = data_dir / "servegen_sample"
    counts = [len(generate_servegen(folder, 1800, 600, seed=s, client_ids=(0,))) for s in range(20)]
    assert np.mean(counts) == pytest.approx(1800, rel=0.03)  # 3 req/s Weibull window
    long = generate_servegen(folder, 1200, 600, seed=0, client_ids=(0,), rate_scale=20.0)
    assert len(long) / 600 == pytest.approx(20.0, rel=0.15)
    assert _cv(long) == pytest.approx(2.0, rel=0.2)


def test_servegen_real_folders(shared_traces: Path) -> None:
    reason = generate_servegen(shared_traces / "servegen/reason/deepseek-r1", duration_s=1200, seed=0)
    assert 0.5 < len(reason) / 1200 / 16.0 < 2.0  # aggregate mean rate ~16 req/s over the day
    assert 500 < reason.prompt_tokens.mean() < 4000
    ids = tuple(range(20))
    trace_only = load_trace(
        "servegen-m-large", duration_s=600, client_ids=ids, fallback=LengthSampler(500, 50)
    )
    assert len(trace_only) > 100 and set(trace_only.prompt_tokens.tolist()) == {500}
    with pytest.raises(ValueError, match="client id"):
        load_trace("servegen-m-large", client_ids=(99_999,))


def test_transforms_keep_failed_flags(data_dir: Path) -> None:
    trace = load_trace(data_dir / "burstgpt_v1_synthetic.csv")
    assert trace.failed is not None
    tiled = tile(trace, 75)
    assert (
        tiled.failed is not None and int(tiled.failed.sum()) == 3 + 3 + 1
    )  # two full copies + the first failure of the third
    window = time_window(trace, 200.0, 400.0)
    assert window.failed is not None and int(window.failed.sum()) == 2  # failures at 214 s and 372 s
