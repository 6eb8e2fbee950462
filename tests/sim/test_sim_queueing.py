"""Queueing theory checks: a FIFO instance with fixed service time is an M/D/1 queue."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from orchestrator.core.admission import AdmissionConfig
from orchestrator.core.types import ClusterSnapshot, Role
from simulations.latency.trivial import FixedLatency
from simulations.sim.cluster import ClusterConfig, ClusterSim, ControlDecision, PoolSpec
from simulations.sim.results import collect
from simulations.traces.trace import Trace

SERVICE_S = 0.01


def _fifo_cluster(control_interval_s: float | None = None) -> ClusterConfig:
    # One token per request and a one-token step budget: one request per step, FIFO.
    pool = PoolSpec(Role.COLOCATED, 1, kv_blocks=1 << 20, max_batched_tokens=1)
    admission = AdmissionConfig(max_context_tokens=1 << 30, max_queued_prefill_tokens=1 << 30,
                                max_waiting_requests=1 << 30)
    return ClusterConfig(pools=(pool,), admission=admission, control_interval_s=control_interval_s)


def _poisson_trace(n: int, rate_rps: float, seed: int) -> Trace:
    rng = np.random.default_rng(seed)
    arrival_s = np.cumsum(rng.exponential(1.0 / rate_rps, n))
    ones = np.ones(n, dtype=np.int64)
    return Trace("poisson", arrival_s, ones, ones)


@pytest.mark.slow
def test_mean_wait_matches_md1_formula() -> None:
    rho = 0.6
    mu = 1.0 / SERVICE_S
    trace = _poisson_trace(100_000, rho * mu, seed=7)
    sim = ClusterSim(trace, FixedLatency(SERVICE_S), _fifo_cluster())
    sim.run()
    result = collect(sim)
    wait_s = result.ttft_s - SERVICE_S  # TTFT = queueing + one service time
    expected_s = rho / (2 * mu * (1 - rho))
    assert np.all(wait_s > -1e-12)
    assert abs(wait_s.mean() - expected_s) / expected_s < 0.03
    # Sanity that the formula is sensitive here: M/M/1 would predict twice the wait.
    assert abs(wait_s.mean() - 2 * expected_s) / expected_s > 0.5


class _CountInSystem:
    """Controller policy that samples how many requests are inside the cluster."""

    def __init__(self) -> None:
        self.samples: list[int] = []

    def decide(self, snapshot: ClusterSnapshot, now_s: float) -> Sequence[ControlDecision]:
        self.samples.append(sum(i.waiting_requests + i.running_requests for i in snapshot.instances))
        return ()


@pytest.mark.slow
def test_littles_law_time_average_equals_rate_times_sojourn() -> None:
    rho = 0.7
    trace = _poisson_trace(30_000, rho / SERVICE_S, seed=3)
    counter = _CountInSystem()
    # Sampling at an interval incommensurate with the service time avoids aliasing.
    sim = ClusterSim(trace, FixedLatency(SERVICE_S), _fifo_cluster(control_interval_s=0.0517), counter)
    sim.run()
    result = collect(sim)
    sojourn_s = float(result.e2e_s.mean())
    rate_rps = len(trace) / float(trace.arrival_s[-1])
    time_avg_in_system = float(np.mean(counter.samples))
    assert len(counter.samples) > 5_000
    assert abs(time_avg_in_system - rate_rps * sojourn_s) / (rate_rps * sojourn_s) < 0.02
