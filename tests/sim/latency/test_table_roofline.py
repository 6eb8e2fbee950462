"""Table interpolation and the roofline model's sanity properties."""

from __future__ import annotations

import numpy as np
import pytest

from simulations.latency import (
    GPUS,
    MODELS,
    BatchShape,
    DecodeSample,
    PrefillSample,
    RooflineLatency,
    TableLatency,
    kv_bytes_per_token,
    kv_capacity_tokens,
    table_from_samples,
)

PREFILL_GRID = {64: 0.010, 256: 0.030, 1024: 0.110}
DECODE_GRID = {(1, 128): 0.006, (1, 1024): 0.008, (8, 128): 0.010, (8, 1024): 0.020}


def _table() -> TableLatency:
    prefill = [PrefillSample(t, t * t, s) for t, s in PREFILL_GRID.items()]
    decode = [DecodeSample(b, b * c, s) for (b, c), s in DECODE_GRID.items()]
    return table_from_samples(prefill, decode)


def test_table_exact_at_grid_points() -> None:
    table = _table()
    for tokens, seconds in PREFILL_GRID.items():
        assert table.prefill_time_s(tokens) == pytest.approx(seconds)
        assert table.step_time_s(
            BatchShape(prefill_tokens=tokens, prefill_tokens_sq=tokens**2, prefill_requests=1)
        ) == pytest.approx(seconds)
    for (batch, ctx), seconds in DECODE_GRID.items():
        assert table.step_time_s(
            BatchShape(decode_requests=batch, decode_context_tokens=batch * ctx)
        ) == pytest.approx(seconds)


def test_table_linear_between_points() -> None:
    table = _table()
    assert table.prefill_time_s(160) == pytest.approx(0.020)  # halfway 64..256
    assert table.prefill_time_s(448) == pytest.approx(0.030 + 0.25 * 0.080)
    # bilinear centre of the decode grid is the mean of its corners
    assert table.decode_time_s(4.5, 576) == pytest.approx(np.mean(list(DECODE_GRID.values())))
    assert table.decode_time_s(1, 576) == pytest.approx(0.007)


def test_table_extrapolation_clamps_below_and_extends_above() -> None:
    table = _table()
    assert table.prefill_time_s(1) == pytest.approx(0.010)
    slope = (0.110 - 0.030) / (1024 - 256)
    assert table.prefill_time_s(2048) == pytest.approx(0.110 + slope * 1024)
    assert table.decode_time_s(16, 128) == pytest.approx(0.010 + (0.004 / 7) * 8)
    assert table.decode_time_s(1, 64) == pytest.approx(0.006)


def test_table_needs_a_full_decode_grid() -> None:
    with pytest.raises(ValueError, match="missing"):
        table_from_samples(
            [PrefillSample(8, 64, 0.01)],
            [DecodeSample(1, 128, 0.1), DecodeSample(2, 512, 0.1), DecodeSample(2, 256, 0.1)],
        )


def _prefill(tokens: int) -> BatchShape:
    return BatchShape(prefill_tokens=tokens, prefill_tokens_sq=tokens * tokens, prefill_requests=1)


def test_roofline_prefill_compute_bound_and_linear_at_large_prompts() -> None:
    model = RooflineLatency.named("llama-2-7b", "h100")
    shape = _prefill(8192)
    compute_s = model.flops(shape) / (GPUS["h100"].peak_tflops * 1e12 * model.mfu)
    assert model.step_time_s(shape) == pytest.approx(compute_s)
    # dense FLOPs dominate: per-token time nearly constant from 2k to 4k (attention adds a little)
    per_token_2k = model.step_time_s(_prefill(2048)) / 2048
    per_token_4k = model.step_time_s(_prefill(4096)) / 4096
    assert 1.0 < per_token_4k / per_token_2k < 1.15
    # ~2 * params FLOPs per token
    assert model.flops(_prefill(1)) == pytest.approx(2 * MODELS["llama-2-7b"].num_params, rel=0.02)


@pytest.mark.parametrize("gpu", list(GPUS))
def test_roofline_decode_batch1_is_weight_bandwidth_bound(gpu: str) -> None:
    model = RooflineLatency.named("llama-2-7b", gpu)
    spec = GPUS[gpu]
    t = model.step_time_s(BatchShape(decode_requests=1, decode_context_tokens=128))
    ideal = MODELS["llama-2-7b"].weight_bytes / (spec.memory_bandwidth_gbps * 1e9)
    assert ideal < t <= ideal / model.mbu * 1.01
    assert t == pytest.approx(ideal / model.mbu, rel=0.01)


def test_roofline_gpu_ordering_and_tp_scaling() -> None:
    shapes = [_prefill(4096), BatchShape(decode_requests=32, decode_context_tokens=32 * 2048)]
    for shape in shapes:
        a100 = RooflineLatency.named("llama-2-13b", "a100-80gb").step_time_s(shape)
        h100 = RooflineLatency.named("llama-2-13b", "h100")
        assert h100.step_time_s(shape) < a100
        tp1, tp2 = h100.step_time_s(shape, 1), h100.step_time_s(shape, 2)
        assert tp1 / 2 < tp2 < tp1  # faster, but the all-reduces keep it from 2x
    l40s = RooflineLatency.named("llama-2-13b", "l40s")
    # PCIe all-reduce makes TP much less useful than on NVLink for a large prefill
    l40s_gain = l40s.step_time_s(shapes[0], 1) / l40s.step_time_s(shapes[0], 2)
    h100_gain = RooflineLatency.named("llama-2-13b", "h100").step_time_s(
        shapes[0], 1
    ) / RooflineLatency.named("llama-2-13b", "h100").step_time_s(shapes[0], 2)
    assert l40s_gain < h100_gain


def test_kv_helpers() -> None:
    llama2 = MODELS["llama-2-7b"]
    assert kv_bytes_per_token(llama2) == 2 * 32 * 4096 * 2  # 512 KiB
    assert kv_bytes_per_token(MODELS["llama-2-70b"]) == 2 * 80 * 8 * 128 * 2  # GQA: 8 KV heads
    cap = kv_capacity_tokens(llama2, GPUS["a100-80gb"], memory_fraction=0.9)
    assert cap == int((72e9 - llama2.weight_bytes) // kv_bytes_per_token(llama2))
    assert kv_capacity_tokens(llama2, GPUS["h200"]) > cap
    with pytest.raises(ValueError, match="do not fit"):
        kv_capacity_tokens(MODELS["llama-2-70b"], GPUS["h100"], tp_degree=1)
    assert kv_capacity_tokens(MODELS["llama-2-70b"], GPUS["h100"], tp_degree=4) > 0
