"""Closed-form decode runs equal step-by-step sums for every shipped latency model."""

from __future__ import annotations

import random

import pytest

from simulations.latency.base import BatchShape, LatencyModel
from simulations.latency.regression import RegressionLatency
from simulations.latency.roofline import RooflineLatency, tp_scaling_for
from simulations.latency.trivial import FixedLatency, ZeroLatency
from simulations.sim.cost import StepCoster
from simulations.sim.runcost import closed_form_runs, closed_form_runs_at

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


@pytest.mark.parametrize("name", ["roofline-a100-13b", "roofline-l40s-7b-overhead"])
def test_a_one_step_run_is_the_step_time(name: str) -> None:
    # The one-step shortcut must agree with the latency model on both sides of the roofline.
    model = MODELS[name]
    run = closed_form_runs(model)
    assert run is not None
    rng = random.Random(5)
    for _ in range(300):
        batch, context, tp = rng.randint(1, 600), rng.randint(0, 900_000), rng.choice([1, 2, 4])
        step = model.step_time_s(BatchShape(decode_requests=batch, decode_context_tokens=context), tp)
        assert run(batch, context, 1, tp) == pytest.approx(step, rel=1e-9, abs=0.0)
        two = run(batch, context, 1, tp) + run(batch, context + batch, 1, tp)
        assert run(batch, context, 2, tp) == pytest.approx(two, rel=1e-12)


class _CountingModel:
    """A pure latency model that counts its evaluations."""

    def __init__(self) -> None:
        self.calls = 0

    def step_time_s(self, shape: BatchShape, tp_degree: int = 1) -> float:
        self.calls += 1
        return 1e-3 + 1e-6 * shape.prefill_tokens + 1e-7 * shape.prefill_tokens_sq + 1e-5 * shape.decode_requests


def test_mixed_steps_are_costed_once_per_shape_and_the_memo_stays_bounded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    model = _CountingModel()
    coster = StepCoster(model, 1)
    first = coster.mixed_step_s(100, 100 * 100, 1, 3, 900)
    assert first == model.step_time_s(BatchShape(100, 100 * 100, 1, 3, 900))
    calls = model.calls
    assert coster.mixed_step_s(100, 100 * 100, 1, 3, 900) == first and model.calls == calls
    assert coster.mixed_step_s(101, 101 * 101, 1, 3, 900) != first and model.calls == calls + 1
    monkeypatch.setattr("simulations.sim.cost.STEP_MEMO_ENTRIES", 4)
    for tokens in range(10):
        coster.mixed_step_s(tokens, tokens * tokens, 1, 0, 0)
    assert 1 <= len(coster._steps_s) <= 4
    assert coster.mixed_step_s(9, 81, 1, 0, 0) == model.step_time_s(BatchShape(9, 81, 1, 0, 0))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_runs_at_one_tp_degree_equal_the_general_form(name: str) -> None:
    model = MODELS[name]
    general = closed_form_runs(model)
    assert general is not None
    rng = random.Random(9)
    for tp in (1, 2, 8):
        at_tp = closed_form_runs_at(model, tp)
        assert at_tp is not None
        for _ in range(40):
            batch, context, steps = rng.randint(1, 512), rng.randint(0, 600_000), rng.randint(1, 300)
            value = at_tp(batch, context, steps)
            assert type(value) is float and value == general(batch, context, steps, tp)
    assert closed_form_runs_at(_CountingModel(), 1) is None
