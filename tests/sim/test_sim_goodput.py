"""Goodput search: bisection on rate, placement enumeration."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.core.slo import SLOTarget
from simulations.experiments.goodput import placement_goodput, placements, search_max_rate
from simulations.experiments.specs import ClusterKnobs, LatencySetup, Placement, load_latency
from simulations.latency.trivial import FixedLatency
from simulations.traces.trace import Trace


def test_bisection_finds_a_step_threshold() -> None:
    result = search_max_rate(lambda rate: 1.0 if rate <= 7.3 else 0.5, start_rps=1.0, target=0.9, rel_tol=0.01)
    assert 7.3 / 1.01 <= result.goodput_rps <= 7.3
    assert not result.saturated
    assert all(p.attainment == (1.0 if p.rate_rps <= 7.3 else 0.5) for p in result.points)


def test_bisection_reports_never_and_always_passing() -> None:
    never = search_max_rate(lambda rate: 0.0, 1.0, 0.9)
    assert never.goodput_rps == 0.0 and len(never.points) == 7  # gives up at start / 64
    always = search_max_rate(lambda rate: 1.0, 1.0, 0.9, max_expand=4)
    assert always.saturated and always.goodput_rps == 16.0
    with pytest.raises(ValueError):
        search_max_rate(lambda rate: 1.0, 0.0, 0.9)


def test_goodput_of_a_fifo_server_matches_the_analytic_threshold() -> None:
    # N evenly spaced one-token requests on a server taking D per request. Above rate 1/D
    # request n waits n(D - gap); it meets TTFT <= 1.5 D while n(D - gap) <= D/2, so 90% of
    # N meet it iff gap >= D (1 - 1 / (2 (0.9 N - 1))).
    n, service_s = 200, 0.01
    trace = Trace("even", np.arange(n, dtype=np.float64) * 0.05, np.ones(n, dtype=np.int64), np.ones(n, dtype=np.int64))
    latency = LatencySetup("fixed:0.01", FixedLatency(service_s), 0.0)
    knobs = ClusterKnobs(max_batched_tokens=1, kv_blocks=1000)
    slo = SLOTarget(ttft_s=1.5 * service_s, tpot_s=1.0)
    found = placement_goodput(trace, latency, Placement(colocated=1), knobs, slo, rel_tol=0.02)
    threshold_rps = 1.0 / (service_s * (1.0 - 1.0 / (2 * (0.9 * n - 1))))
    assert threshold_rps / 1.02 <= found.search.goodput_rps <= threshold_rps * (1 + 1e-9)
    assert found.per_gpu_rps == found.search.goodput_rps
    assert any(p.attainment < 0.9 for p in found.search.points)


def test_placements_cover_the_budget_and_skip_tp_degrees_that_do_not_fit() -> None:
    latency = load_latency("roofline:a100-80gb:llama-2-70b")  # 138 GB of weights: needs TP >= 2
    found = placements(4, [1, 2, 4], latency)
    labels = {p.label for p in found}
    assert labels == {"2C(tp2)", "1C(tp4)", "1P(tp2)+1D(tp2)"}
    small = placements(3, [1], load_latency("roofline:a100-80gb:llama-2-13b"))
    assert {p.label for p in small} == {"3C(tp1)", "1P(tp1)+1D(tp1)", "1P(tp1)+2D(tp1)", "2P(tp1)+1D(tp1)"}
    assert all(p.num_gpus <= 3 for p in small)


def test_latency_specs_parse_and_reject_bad_input() -> None:
    setup = load_latency("roofline:a100-80gb:llama-2-13b")
    assert setup.kv_bytes_per_token == 2 * 40 * 5120 * 2
    assert setup.kv_blocks(2, 16) > 2 * setup.kv_blocks(1, 16)  # the second GPU adds no weights
    assert load_latency("fixed:0.02").model.step_time_s.__self__.step_s == 0.02  # type: ignore[attr-defined]
    for bad in ("roofline:a100-80gb", "roofline:nope:llama-2-13b", "fixed:abc", "warp:9"):
        with pytest.raises(ValueError):
            load_latency(bad)
