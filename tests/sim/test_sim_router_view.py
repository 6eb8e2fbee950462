"""The simulated router sees the cluster as the live one does: a view refreshed every
``router_refresh_s``, with each routing decision booked into it (``apply_route``) in between."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from sim_models import AffineModel, ConstantModel
from sim_scenarios import FlappingHealth, random_trace

from orchestrator.core.admission import AdmissionConfig, admit
from orchestrator.core.routing import RouteDecision, apply_route, route
from orchestrator.core.slo import OverloadAction
from orchestrator.core.types import ClusterSnapshot, InstanceHealth, InstanceLoad, RequestInfo, Role
from simulations.sim.cluster import (
    LIVE_ROUTER_REFRESH_S,
    ClusterConfig,
    ClusterSim,
    PoolSpec,
    colocated,
    disaggregated,
)
from simulations.sim.instance import Events
from simulations.sim.results import collect
from simulations.traces.trace import Trace

_PROBE_PROMPTS = (8, 200, 1500, 6000, 70_000)


class _CheckedView(ClusterSim):
    """Checks every view the router uses against the loads at its last refresh plus the bookings since."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.base: ClusterSnapshot | None = None
        self.base_at_s = -math.inf
        self.booked: list[tuple[RequestInfo, RouteDecision]] = []
        self.refresh_gaps_s: list[float] = []
        self.checks = 0
        self.stale = 0  # views that differed from the instances' true loads
        self.retries = 0
        self.last_view: tuple[InstanceLoad, ...] = ()

    def router_view(self, now_s: float) -> ClusterSnapshot:
        refreshes = self.router_refreshes
        view = super().router_view(now_s)
        truth = tuple([inst.load() for inst in self.instances])
        if self.router_refreshes != refreshes:
            self.refresh_gaps_s.append(now_s - self.base_at_s)
            self.base, self.base_at_s, self.booked = ClusterSnapshot(now_s, truth), now_s, []
        assert self.base is not None and now_s - self.base_at_s < self.config.router_refresh_s + 1e-9
        expected = self.base
        for info, where in self.booked:
            expected = apply_route(expected, info, where)
        assert view.instances == expected.instances
        fresh = ClusterSnapshot(now_s, expected.instances)  # sorted afresh, nothing carried over
        for prompt in _PROBE_PROMPTS:
            probe = RequestInfo("probe", prompt, 100, now_s)
            assert route(view, probe, self.config.routing) == route(fresh, probe, self.config.routing)
            assert admit(view, probe, self.config.admission, 2) == admit(fresh, probe, self.config.admission, 2)
        self.stale += view.instances != truth
        self.checks += 1
        self.last_view = view.instances
        return view

    def _book(self, info: RequestInfo, where: RouteDecision) -> None:
        # The decision being booked is the one routing makes over the view just checked.
        assert where == route(ClusterSnapshot(0.0, self.last_view), info, self.config.routing)
        self.booked.append((info, where))
        super()._book(info, where)

    def _on_router_retry(self, now_s: float, payload: object) -> Events:
        self.retries += 1
        return super()._on_router_retry(now_s, payload)


CASES = {
    "disagg-preempting": (lambda: random_trace(700, 15.0, 1),
                          disaggregated(2, 2, decode_kv_blocks=900, kv_bytes_per_token=8e5), None),
    "disagg-control": (lambda: random_trace(700, 12.0, 3),
                       disaggregated(3, 2, decode_kv_blocks=1500, control_interval_s=0.7), lambda: FlappingHealth("d1")),
    "router-queue": (lambda: random_trace(900, 200.0, 6, max_prompt=8000), colocated(1, kv_blocks=800), None),
}


def _run(sim: ClusterSim) -> tuple[bytes, ...]:
    sim.run()
    result = collect(sim)
    assert result.summary["finished"] + result.summary["rejected"] == len(sim.trace)
    per_instance = repr([(i.busy_s, i.prefill_tokens_done, i.decode_tokens_done, i.preemptions)
                         for i in sim.instances]).encode()
    return (result.to_json().encode(), result.ttft_s.tobytes(), result.e2e_s.tobytes(), per_instance,
            str(sim.loop.events_run).encode())


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_view_is_the_last_refresh_plus_the_decisions_booked_since(name: str) -> None:
    make_trace, config, make_control = CASES[name]
    assert config.router_refresh_s == LIVE_ROUTER_REFRESH_S == 0.2
    sim = _CheckedView(make_trace(), AffineModel(), config, make_control() if make_control else None)
    sim.run()  # also checks that every request finished or was rejected
    assert sim.checks > 300
    assert 20 < sim.router_refreshes < sim.checks
    assert min(sim.refresh_gaps_s[1:]) > config.router_refresh_s - 1e-9
    assert sim.stale > sim.checks / 10  # between refreshes the router really works from old loads
    if name == "router-queue":
        assert sim.retries > 10 and sim.recorder.rejected_reason.get("queue_full", 0) == 0


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_seed_same_bytes_and_the_refresh_interval_matters(name: str) -> None:
    make_trace, config, make_control = CASES[name]

    def run(refresh_s: float) -> tuple[bytes, ...]:
        cfg = dataclasses.replace(config, router_refresh_s=refresh_s)
        return _run(ClusterSim(make_trace(), AffineModel(), cfg, make_control() if make_control else None))

    first = run(0.2)
    assert run(0.2) == first
    assert run(0.0) != first
    assert run(0.05) != first


def test_refresh_zero_routes_every_arrival_on_the_true_loads() -> None:
    class _Exact(ClusterSim):
        checks = 0

        def router_view(self, now_s: float) -> ClusterSnapshot:
            view = super().router_view(now_s)
            assert view.instances == tuple([inst.load() for inst in self.instances])
            type(self).checks += 1
            return view

    make_trace, config, make_control = CASES["disagg-control"]
    sim = _Exact(make_trace(), AffineModel(), dataclasses.replace(config, router_refresh_s=0.0),
                 make_control() if make_control else None)
    sim.run()
    assert _Exact.checks >= len(sim.trace) and sim.router_refreshes == 0


def _one_instance(router_refresh_s: float, **admission: int) -> ClusterConfig:
    pool = PoolSpec(Role.COLOCATED, 1, kv_blocks=1 << 16)
    limits = AdmissionConfig(max_context_tokens=1 << 30, on_overload=OverloadAction.QUEUE, **admission)  # type: ignore[arg-type]
    return ClusterConfig(pools=(pool,), admission=limits, router_refresh_s=router_refresh_s)


def test_requests_queued_on_a_stale_view_are_admitted_at_the_next_refresh() -> None:
    # Five one-token requests at t=0, at most two waiting per instance: the view books two,
    # queues three; the instance is idle again long before the view refreshes.
    trace = Trace("burst", np.zeros(5), np.full(5, 10), np.ones(5, dtype=np.int64))
    stale = ClusterSim(trace, ConstantModel(0.01), _one_instance(0.2, max_waiting_requests=2))
    stale.run()
    ttft_s = collect(stale).ttft_s
    assert stale.recorder.status.count(1) == 5  # none declared never admissible while the view was old
    assert np.all(ttft_s[:2] < 0.05) and np.all((ttft_s[2:4] >= 0.2) & (ttft_s[2:4] < 0.25)) and ttft_s[4] >= 0.4
    exact = ClusterSim(trace, ConstantModel(0.01), _one_instance(0.0, max_waiting_requests=2))
    exact.run()
    assert exact.recorder.status.count(1) == 5 and np.all(collect(exact).ttft_s < 0.1)


@pytest.mark.parametrize("router_refresh_s", [0.0, 0.2])
def test_a_request_no_idle_cluster_admits_is_rejected_once_the_view_shows_it_idle(router_refresh_s: float) -> None:
    # Request 1's prompt exceeds the queued-prefill limit even on an empty instance; request 2
    # arrives behind it.
    trace = Trace("t", np.array([0.0, 0.05, 0.1]), np.array([100, 5000, 100]), np.ones(3, dtype=np.int64))
    sim = ClusterSim(trace, ConstantModel(0.01), _one_instance(router_refresh_s, max_queued_prefill_tokens=1000))
    sim.run()
    assert sim.recorder.rejected_reason == {"never_admissible": 1} and sim.recorder.status[1] == 2
    ttft_s = collect(sim).ttft_s
    if router_refresh_s:
        # The view taken at t=0 still holds request 0's booking: both wait for the refresh at 0.2.
        assert sim.router_refreshes == 2 and 0.1 <= ttft_s[2] < 0.15
    else:
        assert ttft_s[2] < 0.05


@pytest.mark.parametrize("refresh_s", [-0.1, float("nan"), float("inf")])
def test_bad_router_refresh_intervals_are_rejected(refresh_s: float) -> None:
    with pytest.raises(ValueError, match="router_refresh_s"):
        colocated(1, router_refresh_s=refresh_s)


@pytest.mark.parametrize("fill_slots", [True, False])
def test_booked_loads_equal_dataclass_replace(fill_slots: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # apply_route's fast copy of a report must be indistinguishable from ``dataclasses.replace``.
    from orchestrator.core import types
    from orchestrator.core.types import booked_load

    assert types._FILL_LOAD  # InstanceLoad is a plain slotted dataclass: the fast path applies
    monkeypatch.setattr(types, "_FILL_LOAD", fill_slots)
    rng = np.random.default_rng(11)
    for k in range(40):
        load = InstanceLoad(
            instance_id=f"i{k}", role=[Role.PREFILL, Role.DECODE, Role.COLOCATED][k % 3], node_id=f"n{k % 4}",
            health=[InstanceHealth.HEALTHY, InstanceHealth.DRAINING][k % 2],
            queued_prefill_tokens=int(rng.integers(0, 10_000)), waiting_requests=int(rng.integers(0, 50)),
            running_requests=int(rng.integers(0, 50)), free_kv_blocks=int(rng.integers(0, 900)),
            total_kv_blocks=900, block_size=16 << (k % 3), max_running_requests=64,
            recent_ttft_s=None if k % 2 else float(rng.random()), recent_tpot_s=float(rng.random()),
            reported_at_s=float(k))
        q, w, f = (int(v) for v in rng.integers(0, 1000, 3))
        booked = booked_load(load, q, w, f)
        expected = dataclasses.replace(load, queued_prefill_tokens=q, waiting_requests=w, free_kv_blocks=f)
        assert booked == expected and hash(booked) == hash(expected) and repr(booked) == repr(expected)
        assert booked.is_routable is expected.is_routable
        with pytest.raises(dataclasses.FrozenInstanceError):
            booked.waiting_requests = 0  # type: ignore[misc]
