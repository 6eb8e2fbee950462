"""Closed-form decode runs equal step-by-step sums for every shipped latency model."""

from __future__ import annotations

import random

import pytest

from simulations.latency.base import BatchShape, LatencyModel
from simulations.latency.regression import RegressionLatency
from simulations.latency.roofline import RooflineLatency, tp_scaling_for
from simulations.latency.trivial import FixedLatency, ZeroLatency
from simulations.sim.cost import StepCoster
from simulations.sim.runcost import closed_form_runs

MODELS: dict[str, LatencyModel] = {
    "roofline-a100-13b": RooflineLatency.named("llama-2-13b", "a100-80gb"),
    "roofline-l40s-7b-overhead": RooflineLatency.named("llama-2-7b", "l40s", overhead_s=0.002),
    "regression": RegressionLatency(0.01, 1e-4, 1e-9, 0.008, 2e-7, 3e-5,
                                    tp_scaling_for(RooflineLatency.named("llama-2-13b", "h100").model,
                                                   RooflineLatency.named("llama-2-13b", "h100").gpu)),
    "fixed": FixedLatency(0.02),
    "zero": ZeroLatency(),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_closed_form_equals_the_sum_of_steps(name: str) -> None:
    model = MODELS[name]
    run = closed_form_runs(model)
    assert run is not None
    rng = random.Random(3)
    for _ in range(60):
        batch, context, steps = rng.randint(1, 512), rng.randint(0, 600_000), rng.randint(1, 700)
        tp = rng.choice([1, 2, 4, 8])
        loop = sum(model.step_time_s(BatchShape(decode_requests=batch, decode_context_tokens=context + i * batch), tp)
                   for i in range(steps))
        assert run(batch, context, steps, tp) == pytest.approx(loop, rel=1e-9, abs=1e-12)


def test_roofline_runs_cross_from_compute_to_memory_bound() -> None:
    # A100 + 13B: a batch of 400 is compute-bound at short contexts; KV reads make it memory-bound later.
    model = MODELS["roofline-a100-13b"]
    assert isinstance(model, RooflineLatency)
    short = BatchShape(decode_requests=400, decode_context_tokens=400 * 10)
    long = BatchShape(decode_requests=400, decode_context_tokens=400 * 4000)
    div_c = model.gpu.peak_tflops * 1e12 * model.mfu
    div_m = model.gpu.memory_bandwidth_gbps * 1e9 * model.mbu
    assert model.flops(short) / div_c > model.bytes_moved(short) / div_m  # compute-bound...
    assert model.flops(long) / div_c < model.bytes_moved(long) / div_m  # ...then memory-bound
    run = closed_form_runs(model)
    assert run is not None
    loop = sum(model.step_time_s(BatchShape(decode_requests=400, decode_context_tokens=4000 + i * 400))
               for i in range(4000))  # context 10 -> 4010 tokens per request: crosses over
    assert run(400, 4000, 4000, 1) == pytest.approx(loop, rel=1e-9)


def test_coster_finds_the_step_boundary_after_an_instant() -> None:
    coster = StepCoster(MODELS["fixed"], 1)
    assert coster.steps_by(4, 100, 10, 0.0) == 1
    assert coster.steps_by(4, 100, 10, 0.05) == 3  # boundaries at 0.02, 0.04, 0.06
    assert coster.steps_by(4, 100, 10, 0.04) == 2
    assert coster.steps_by(4, 100, 10, 5.0) == 10
    loop_coster = StepCoster(MODELS["fixed"], 1, use_closed_form=False)
    assert not loop_coster.has_closed_form
    assert [loop_coster.steps_by(4, 100, 10, t) for t in (0.0, 0.05, 0.04, 5.0)] == [1, 3, 2, 10]
