"""Cluster-level behaviour: setups, determinism, controller hook."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from sim_models import AffineModel

from orchestrator.core.slo import SLOTarget
from orchestrator.core.types import ClusterSnapshot, InstanceHealth, Role
from simulations.latency.trivial import ZeroLatency
from simulations.sim.cluster import ClusterSim, ControlDecision, SetHealth, colocated, disaggregated, place
from simulations.sim.results import collect
from simulations.traces.trace import Trace


def _long_prompt_trace(n: int = 600, rate_rps: float = 1.0) -> Trace:
    rng = np.random.default_rng(0)
    return Trace("long-prompts", np.cumsum(rng.exponential(1.0 / rate_rps, n)), np.full(n, 2000), np.full(n, 200))


def test_disaggregation_removes_prefill_interference_from_decodes() -> None:
    # Prefill of a 2000-token prompt costs 0.8 s; a decode step ~6 ms. Colocated decodes stall
    # behind every prefill; on a dedicated decode instance they never do.
    model = AffineModel(prefill_token_s=4e-4)
    slo = SLOTarget(ttft_s=5.0, tpot_s=0.008)
    trace = _long_prompt_trace()
    results = {}
    for config in (colocated(2), disaggregated(1, 1)):
        sim = ClusterSim(trace, model, config)
        sim.run()
        results[config.label] = collect(sim, slo).summary
    coloc, disagg = results["2C(tp1)"], results["1P(tp1)+1D(tp1)"]
    assert disagg["slo"]["attainment"] > 0.9 > 0.6 > coloc["slo"]["attainment"]
    assert coloc["tpot_s"]["p90"] > 2 * disagg["tpot_s"]["p90"]
    assert coloc["tbt_s"]["worst10_mean"] > 5 * disagg["tbt_s"]["worst10_mean"]
    # The price: one prefill instance instead of two queues prompts longer.
    assert disagg["ttft_s"]["p90"] > coloc["ttft_s"]["p90"]


def test_same_inputs_give_byte_identical_results() -> None:
    rng = np.random.default_rng(11)
    n = 1500
    trace = Trace("t", np.cumsum(rng.exponential(1 / 15.0, n)), rng.integers(1, 3000, n), rng.integers(1, 500, n))
    config = disaggregated(2, 2, decode_kv_blocks=1200, kv_bytes_per_token=8e5)
    outputs = []
    for _ in range(2):
        sim = ClusterSim(trace, AffineModel(), config)
        sim.run()
        result = collect(sim, SLOTarget(1.0, 0.05))
        outputs.append((result.to_json().encode(), result.ttft_s.tobytes(), result.e2e_s.tobytes()))
    assert outputs[0] == outputs[1]
    assert b'"preemptions"' in outputs[0][0]


class _DrainFirst:
    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id
        self.ticks = 0

    def decide(self, snapshot: ClusterSnapshot, now_s: float) -> Sequence[ControlDecision]:
        self.ticks += 1
        return [SetHealth(self.instance_id, InstanceHealth.DRAINING)] if self.ticks == 1 else []


def test_controller_decisions_are_applied_drained_instance_gets_no_requests() -> None:
    trace = _long_prompt_trace(n=100, rate_rps=2.0)
    policy = _DrainFirst("c0")
    sim = ClusterSim(trace, AffineModel(), colocated(2, control_interval_s=0.5), policy)
    sim.run()
    summary = collect(sim).summary
    by_id = {i["id"]: i for i in summary["instances"]}
    assert policy.ticks > 10
    assert by_id["c0"]["prefill_tokens"] == 0 and by_id["c1"]["prefill_tokens"] == 2000 * 100
    assert summary["finished"] == 100


def test_unknown_decisions_and_instances_are_errors() -> None:
    sim = ClusterSim(_long_prompt_trace(n=2), AffineModel(), colocated(1))
    with pytest.raises(ValueError, match="unknown instance"):
        sim.apply(SetHealth("nope", InstanceHealth.DRAINING))
    with pytest.raises(TypeError, match="unsupported"):
        sim.apply("migrate everything")  # type: ignore[arg-type]


def test_placement_packs_tp_groups_onto_nodes() -> None:
    specs = place(disaggregated(3, 2, prefill_tp=2, decode_tp=4, gpus_per_node=8))
    assert [(s.instance_id, s.role, s.node_id, s.tp_degree) for s in specs] == [
        ("p0", Role.PREFILL, "node-0", 2), ("p1", Role.PREFILL, "node-0", 2), ("p2", Role.PREFILL, "node-0", 2),
        ("d0", Role.DECODE, "node-1", 4), ("d1", Role.DECODE, "node-1", 4),
    ]
    assert disaggregated(3, 2, prefill_tp=2, decode_tp=4).num_gpus == 14


def test_bad_cluster_configs_are_rejected() -> None:
    with pytest.raises(ValueError, match="at least one instance"):
        colocated(0)
    with pytest.raises(ValueError, match="needs a decode pool"):
        disaggregated(1, 0)
    with pytest.raises(ValueError, match="exceeds gpus_per_node"):
        colocated(1, tp_degree=16)


def test_requests_too_large_for_the_kv_cache_are_rejected_not_lost() -> None:
    trace = Trace("big", np.array([0.0, 0.1]), np.array([100, 5000]), np.array([10, 10]))
    sim = ClusterSim(trace, AffineModel(), colocated(1, kv_blocks=64))  # 1024 tokens
    sim.run()
    summary = collect(sim).summary
    assert summary["finished"] == 1 and summary["rejected"] == 1
    assert summary["rejected_reasons"] == {"exceeds_kv_capacity": 1}


def test_request_overhead_delays_the_router_and_counts_in_ttft_and_e2e() -> None:
    # Free steps and instant KV moves: the overhead is the only latency a request sees.
    n = 200
    trace = Trace("t", np.arange(n, dtype=np.float64) * 0.5, np.full(n, 300), np.full(n, 20))
    sim = ClusterSim(trace, ZeroLatency(), disaggregated(2, 2, request_overhead_s=0.25))
    sim.run()
    result = collect(sim)
    assert result.summary["finished"] == n
    assert np.all(result.ttft_s == 0.25) and np.all(result.e2e_s == 0.25)


@pytest.mark.parametrize("router_refresh_s", [0.0, 0.2])
def test_request_overhead_shifts_every_request_by_the_same_delay(router_refresh_s: float) -> None:
    # Nothing in the cluster reads absolute time (the router's refreshes count from its first
    # look at the cluster), so a fixed overhead only shifts the run.
    rng = np.random.default_rng(5)
    n = 400
    trace = Trace("t", np.cumsum(rng.integers(1, 64, n)) / 256.0, rng.integers(1, 3000, n), rng.integers(1, 300, n))
    runs = []
    for overhead_s in (0.0, 0.125):
        config = disaggregated(2, 2, decode_kv_blocks=700, request_overhead_s=overhead_s,
                               router_refresh_s=router_refresh_s)
        sim = ClusterSim(trace, AffineModel(), config)
        sim.run()
        runs.append(collect(sim))
    base, delayed = runs
    assert np.allclose(delayed.ttft_s, base.ttft_s + 0.125, rtol=0, atol=1e-9)
    assert np.allclose(delayed.e2e_s, base.e2e_s + 0.125, rtol=0, atol=1e-9)
    assert base.summary["preemptions"] == delayed.summary["preemptions"] > 0


@pytest.mark.parametrize("overhead_s", [-0.001, float("nan"), float("inf")])
def test_bad_request_overheads_are_rejected(overhead_s: float) -> None:
    with pytest.raises(ValueError, match="request_overhead_s"):
        colocated(1, request_overhead_s=overhead_s)
