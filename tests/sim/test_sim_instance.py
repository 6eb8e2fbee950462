"""Instance models: batching policies, KV preemption, decode runs, conservation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from sim_models import AffineModel

from orchestrator.core.types import Role
from simulations.latency.base import BatchShape
from simulations.latency.trivial import ZeroLatency
from simulations.sim.cluster import ClusterConfig, ClusterSim, PoolSpec, colocated, disaggregated
from simulations.sim.instance import BatchPolicy
from simulations.sim.recorder import ConservationError, Recorder, RequestStatus
from simulations.sim.results import collect
from simulations.traces.trace import Trace


def _random_trace(n: int, rate_rps: float, seed: int, max_prompt: int = 2000, max_output: int = 400) -> Trace:
    rng = np.random.default_rng(seed)
    return Trace("random", np.cumsum(rng.exponential(1.0 / rate_rps, n)),
                 rng.integers(1, max_prompt, n), rng.integers(1, max_output, n))


class _ShapeLog(AffineModel):
    """Affine model that remembers every step shape it costed."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[BatchShape] = []

    def step_time_s(self, shape: BatchShape, tp_degree: int = 1) -> float:
        self.shapes.append(shape)
        return super().step_time_s(shape, tp_degree)


def test_chunked_prefill_respects_the_token_budget() -> None:
    budget = 512
    model = _ShapeLog()
    pool = PoolSpec(Role.COLOCATED, 1, kv_blocks=20_000, policy=BatchPolicy.CHUNKED, max_batched_tokens=budget)
    sim = ClusterSim(_random_trace(400, 6.0, seed=1), model, ClusterConfig(pools=(pool,)))
    sim.run()
    mixed = [s for s in model.shapes if s.prefill_tokens > 0]
    assert mixed, "no prefill steps were costed"
    assert max(s.prefill_tokens + s.decode_requests for s in mixed) <= budget
    # Prompts longer than the budget really were split, and decodes rode along with chunks.
    assert any(s.prefill_tokens == budget - s.decode_requests for s in mixed)
    assert any(s.decode_requests > 0 for s in mixed)
    assert sum(s.prefill_tokens for s in mixed) == int(sim.trace.prompt_tokens.sum())
    assert collect(sim).summary["finished"] == 400


@pytest.mark.parametrize("policy", [BatchPolicy.PREFILL_FIRST, BatchPolicy.CHUNKED])
def test_preemption_under_tiny_kv_still_completes_every_request(policy: BatchPolicy) -> None:
    trace = _random_trace(300, 20.0, seed=2, max_prompt=300, max_output=300)
    # 48 blocks of 16 tokens: room for two or three requests; most must be preempted and recomputed.
    config = colocated(1, kv_blocks=48, policy=policy)
    sim = ClusterSim(trace, AffineModel(), config)
    sim.run()
    result = collect(sim)
    assert result.summary["preemptions"] > 20
    assert result.summary["finished"] == len(trace)
    assert np.all(result.status == RequestStatus.FINISHED)
    assert np.all(result.e2e_s >= result.ttft_s)


def test_disaggregated_decode_preemption_recomputes_locally() -> None:
    trace = _random_trace(300, 10.0, seed=3, max_prompt=300, max_output=300)
    config = disaggregated(1, 1, prefill_kv_blocks=1000, decode_kv_blocks=60, kv_bytes_per_token=1e5)
    sim = ClusterSim(trace, AffineModel(), config)
    sim.run()
    s = collect(sim).summary
    assert s["finished"] == len(trace)
    decode = next(i for i in s["instances"] if i["role"] == "decode")
    assert decode["preemptions"] > 0 and decode["prefill_tokens"] > 0  # recomputed on D


@pytest.mark.slow
@pytest.mark.parametrize("config", [
    colocated(2, kv_blocks=1500),
    colocated(2, kv_blocks=800, policy=BatchPolicy.CHUNKED),
    disaggregated(2, 2, decode_kv_blocks=900, kv_bytes_per_token=8e5),
], ids=["prefill-first", "chunked", "disaggregated"])
def test_decode_runs_give_the_same_results_as_single_steps(config: ClusterConfig) -> None:
    # Heavy load and small caches: queueing, router back-pressure and many preemptions.
    trace = _random_trace(2500, 25.0, seed=4)
    results = []
    for jump in (True, False):
        sim = ClusterSim(trace, AffineModel(), dataclasses.replace(config, jump_decode_steps=jump))
        sim.run()
        results.append((collect(sim), sim.loop.events_run))
    (fast, fast_events), (slow, slow_events) = results
    assert fast.summary["preemptions"] > 0
    assert fast_events * 2 < slow_events  # runs really do skip events
    np.testing.assert_array_equal(fast.status, slow.status)
    np.testing.assert_allclose(fast.ttft_s, slow.ttft_s, rtol=1e-9, equal_nan=True)
    np.testing.assert_allclose(fast.e2e_s, slow.e2e_s, rtol=1e-9, equal_nan=True)
    np.testing.assert_array_equal(fast.preemptions, slow.preemptions)
    assert fast.summary["tbt_s"]["worst10_mean"] == pytest.approx(slow.summary["tbt_s"]["worst10_mean"], rel=0.03)
    assert fast.summary["tbt_s"]["mean"] == pytest.approx(slow.summary["tbt_s"]["mean"], rel=1e-6)


def test_closed_form_and_step_by_step_costing_agree() -> None:
    trace = _random_trace(600, 12.0, seed=5)
    ttfts = []
    for closed_form in (True, False):
        sim = ClusterSim(trace, AffineModel(closed_form=closed_form), colocated(2, kv_blocks=1200))
        sim.run()
        ttfts.append(collect(sim).e2e_s)
    np.testing.assert_allclose(ttfts[0], ttfts[1], rtol=1e-9)


@pytest.mark.parametrize("config", [colocated(3), disaggregated(2, 2), disaggregated(1, 2, kv_bytes_per_token=1e6)],
                         ids=["colocated", "disaggregated", "disaggregated-with-transfer"])
def test_free_steps_give_zero_ttft_and_conserve_every_request(config: ClusterConfig) -> None:
    trace = _random_trace(3000, 50.0, seed=6)
    sim = ClusterSim(trace, ZeroLatency(), config)
    sim.run()  # raises ConservationError if any request was lost
    result = collect(sim)
    assert result.summary["finished"] == len(trace) and result.summary["rejected"] == 0
    assert np.all(result.ttft_s == 0.0)
    if config.kv_bytes_per_token == 0:
        assert np.all(result.e2e_s == 0.0)
    else:  # only the KV transfer takes time
        assert np.all(result.e2e_s >= 0.0) and result.e2e_s.max() > 0.0
    decoded = sum(i["decode_tokens"] for i in result.summary["instances"])
    assert decoded == int((trace.output_tokens - 1).sum())  # every token generated exactly once


def test_conservation_errors_are_raised() -> None:
    rec = Recorder(3)
    rec.finish(0, 1.0)
    with pytest.raises(ConservationError, match="completed twice"):
        rec.finish(0, 1.0)
    rec.reject(1, "overloaded")
    with pytest.raises(ConservationError, match="1 requests never finished"):
        rec.check_conservation()
