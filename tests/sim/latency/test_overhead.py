"""Serving overheads: the step-overhead latency model, their place in a simulated request's life, the fit."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from orchestrator.core.types import Role
from simulations.latency import (
    BatchShape,
    DecodeSample,
    FixedLatency,
    IdleSample,
    LatencyProfile,
    OverheadLatency,
    Overheads,
    PrefillSample,
    ProfileFormatError,
    RegressionLatency,
    RooflineLatency,
    fit_overheads,
    load_overheads,
    probe_plan,
    read_profile,
    table_from_samples,
    with_step_overheads,
    write_profile,
)
from simulations.sim.cluster import ClusterConfig, ClusterSim, PoolSpec
from simulations.sim.cost import DecodeRunLatency, StepCoster
from simulations.sim.network import LinkConfig
from simulations.sim.results import collect
from simulations.sim.types import BatchPolicy
from simulations.traces.trace import Trace

PREFILL = BatchShape(prefill_tokens=256, prefill_tokens_sq=256 * 256, prefill_requests=1)
DECODE = BatchShape(decode_requests=4, decode_context_tokens=4 * 300)
MIXED = BatchShape(prefill_tokens=64, prefill_tokens_sq=64 * 64, prefill_requests=1, decode_requests=4,
                   decode_context_tokens=1200)
REGRESSION = RegressionLatency(0.004, 2e-5, 1e-9, 0.006, 3e-8, 2e-4)
OVH = Overheads(request_s=0.03, handoff_s=0.01, prefill_step_s=0.002, decode_step_s=0.004)


def test_each_step_pays_its_phase_overhead_and_a_mixed_step_the_larger() -> None:
    model = OverheadLatency(REGRESSION, OVH)
    assert model.step_time_s(PREFILL) == pytest.approx(REGRESSION.step_time_s(PREFILL) + 0.002)
    assert model.step_time_s(DECODE) == pytest.approx(REGRESSION.step_time_s(DECODE) + 0.004)
    assert model.step_time_s(MIXED) == pytest.approx(REGRESSION.step_time_s(MIXED) + 0.004)
    assert model.step_time_s(DECODE, tp_degree=4) == pytest.approx(REGRESSION.step_time_s(DECODE, 4) + 0.004)
    assert model.step_time_s(BatchShape()) == 0.0


@pytest.mark.parametrize("inner", [REGRESSION, RooflineLatency.named("llama-2-7b", "a100-80gb"), FixedLatency(0.01)])
def test_decode_runs_keep_a_closed_form_equal_to_summing_steps(inner: object) -> None:
    model = with_step_overheads(inner, OVH)  # type: ignore[arg-type]
    assert isinstance(model, DecodeRunLatency)
    for batch, context, steps, tp in ((1, 100, 1, 1), (8, 4000, 37, 1), (32, 60_000, 200, 2)):
        summed = sum(model.step_time_s(BatchShape(decode_requests=batch, decode_context_tokens=context + i * batch),
                                       tp) for i in range(steps))
        assert model.decode_run_time_s(batch, context, steps, tp) == pytest.approx(summed, rel=1e-9)
        bare = StepCoster(inner, tp).run_s(batch, context, steps)  # type: ignore[arg-type]
        assert StepCoster(model, tp).run_s(batch, context, steps) == pytest.approx(bare + steps * 0.004)


def test_a_model_without_a_closed_form_is_costed_step_by_step() -> None:
    table = table_from_samples(
        [PrefillSample(n, n * n, 0.01 + 1e-5 * n) for n in (64, 512)],
        [DecodeSample(b, b * c, 0.005 + 1e-4 * b) for b in (1, 8) for c in (100, 1000)],
    )
    model = with_step_overheads(table, OVH)
    assert not isinstance(model, DecodeRunLatency)
    coster = StepCoster(model, 1)
    assert not coster.has_closed_form
    assert coster.run_s(4, 400, 10) == pytest.approx(StepCoster(table, 1).run_s(4, 400, 10) + 10 * 0.004)


def test_no_step_terms_leave_the_model_as_it_is() -> None:
    assert with_step_overheads(REGRESSION, Overheads(request_s=0.05, handoff_s=0.01)) is REGRESSION


@pytest.mark.parametrize("bad", [-0.001, math.nan, math.inf])
def test_overheads_must_be_finite_and_non_negative(bad: float) -> None:
    with pytest.raises(ValueError, match="decode_step_s"):
        Overheads(decode_step_s=bad)


def _one_by_one(shapes: list[tuple[int, int]], spacing_s: float = 5.0) -> Trace:
    return Trace(name="probe", arrival_s=np.arange(len(shapes), dtype=np.float64) * spacing_s,
                 prompt_tokens=np.array([p for p, _ in shapes], dtype=np.int64),
                 output_tokens=np.array([o for _, o in shapes], dtype=np.int64))


def _simulate(trace: Trace, overheads: Overheads, step_s: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """TTFT and e2e of each request on 1P+1D (same node, 1 GB/s, 1 MB of KV per token)."""
    config = ClusterConfig(
        pools=(PoolSpec(Role.PREFILL, 1, policy=BatchPolicy.CHUNKED), PoolSpec(Role.DECODE, 1)),
        links=LinkConfig(intra_node_gbps=1.0, inter_node_gbps=1.0, transfer_latency_s=overheads.handoff_s),
        kv_bytes_per_token=1e6, request_overhead_s=overheads.request_s,
    )
    sim = ClusterSim(trace, with_step_overheads(FixedLatency(step_s), overheads), config)
    sim.run()
    result = collect(sim)
    return result.ttft_s, result.e2e_s


def test_a_request_alone_pays_every_overhead_once_in_its_place() -> None:
    ttft, e2e = _simulate(_one_by_one([(100, 5)]), OVH)
    # Router sees it at 0.03; prefill step 0.01 + 0.002; 100 MB of KV at 1 GB/s (0.1 s) and the
    # 0.01 s hand-off; then 4 decode steps of 0.01 + 0.004.
    assert ttft[0] == pytest.approx(0.03 + 0.012)
    assert e2e[0] == pytest.approx(0.042 + 0.1 + 0.01 + 4 * 0.014)


def test_fit_recovers_overheads_from_requests_served_alone() -> None:
    # The "live" side is the simulator with known overheads: the fit must find them again
    # from the gap to the bare simulator, as the twin check does against the live system.
    shapes = [(128, 8), (256, 32), (512, 8), (128, 32), (256, 8), (512, 32)]
    truth = Overheads(request_s=0.035, handoff_s=0.012, decode_step_s=0.003)
    live_ttft, live_e2e = _simulate(_one_by_one(shapes), truth)
    bare_ttft, bare_e2e = _simulate(_one_by_one(shapes), Overheads())
    samples = [IdleSample(o, lt, le, bt, be) for (_, o), lt, le, bt, be in
               zip(shapes, live_ttft, live_e2e, bare_ttft, bare_e2e, strict=True)]
    fitted = fit_overheads(samples)
    assert fitted.request_s == pytest.approx(0.035)
    assert fitted.handoff_s == pytest.approx(0.012)
    assert fitted.decode_step_s == pytest.approx(0.003)
    # One request slowed by another process moves neither term much (medians, not means).
    slowed = samples[:3] + [replace(samples[3], live_ttft_s=samples[3].live_ttft_s + 0.5,
                                    live_e2e_s=samples[3].live_e2e_s + 1.5)] + samples[4:]
    robust = fit_overheads(slowed)
    assert robust.request_s == pytest.approx(0.035, abs=0.005)
    assert robust.decode_step_s == pytest.approx(0.003, abs=0.001)


def test_fit_with_one_output_length_puts_the_decode_gap_per_step_and_clamps_at_zero() -> None:
    same = [IdleSample(11, 0.05, 0.35, 0.03, 0.23), IdleSample(11, 0.06, 0.36, 0.03, 0.23)]
    fitted = fit_overheads(same)
    assert fitted.request_s == pytest.approx(0.025)
    assert fitted.handoff_s == 0.0 and fitted.decode_step_s == pytest.approx(0.1 / 10)
    faster_live = fit_overheads([IdleSample(5, 0.01, 0.05, 0.02, 0.10), IdleSample(9, 0.01, 0.08, 0.02, 0.2)])
    assert faster_live == Overheads()
    with pytest.raises(ValueError, match="at least one"):
        fit_overheads([])


def test_probe_plan_sends_one_at_a_time_alone_then_beside_a_long_decode() -> None:
    plan = probe_plan(4, 3, spacing_s=1.0, min_decode_step_s=0.01)
    assert [p.at_s for p in plan] == [float(i) for i in range(8)]
    assert [p.background for p in plan] == [False] * 4 + [True] + [False] * 3
    assert [p.decode_batch for p in plan if not p.background] == [1] * 4 + [2] * 3
    # The background decode (at >= 10 ms a step) outlasts the busy probes.
    assert plan[4].output_tokens * 0.01 >= 4.0
    shapes = {(p.prompt_tokens, p.output_tokens) for p in plan[:4]}
    assert len({o for _, o in shapes}) == 2 and len({p for p, _ in shapes}) == 3  # both output lengths
    assert not any(p.background for p in probe_plan(3))
    with pytest.raises(ValueError, match="probe counts"):
        probe_plan(-1)


def test_busy_fraction_mixes_the_request_overhead_of_idle_and_busy_probes() -> None:
    alone = [IdleSample(8, 0.05, 0.12, 0.03, 0.10)] * 3
    beside = [IdleSample(8, 0.13, 0.20, 0.03, 0.10, decode_batch=2)] * 3
    assert fit_overheads(alone + beside).request_s == pytest.approx(0.10)  # default: as if always busy
    assert fit_overheads(alone + beside, busy_fraction=0.0).request_s == pytest.approx(0.02)
    assert fit_overheads(alone + beside, busy_fraction=0.25).request_s == pytest.approx(0.04)
    with pytest.raises(ValueError, match="busy_fraction"):
        fit_overheads(alone, busy_fraction=1.5)


def test_decode_overhead_splits_into_per_step_and_per_running_request() -> None:
    # Per decode step: 3 ms + 2 ms per running request; hand-off 10 ms. Batch 1 and batch 2 probes.
    samples = [IdleSample(n, 0.05, 0.05 + 0.010 + (n - 1) * (0.003 + 0.002 * b), 0.03, 0.03, decode_batch=b)
               for b in (1, 2) for n in (8, 32, 8, 32)]
    fitted = fit_overheads(samples)
    assert fitted.handoff_s == pytest.approx(0.010)
    assert fitted.decode_step_s == pytest.approx(0.003)
    assert fitted.decode_token_s == pytest.approx(0.002)
    model = with_step_overheads(FixedLatency(0.01), fitted)
    assert model.step_time_s(BatchShape(decode_requests=4, decode_context_tokens=400)) == pytest.approx(0.021)


def _profile(tmp_path: Path, overheads: Overheads | None) -> Path:
    path = tmp_path / "profile.json"
    prefill = tuple(PrefillSample(n, n * n, 0.002 + 1e-5 * n) for n in (32, 512))
    decode = tuple(DecodeSample(b, b * 100, 0.005 + 1e-4 * b) for b in (1, 8))
    write_profile(path, LatencyProfile({"model": "t"}, prefill, decode, overheads=overheads))
    return path


def test_profiles_store_overheads_and_older_files_load_without(tmp_path: Path) -> None:
    path = _profile(tmp_path, OVH)
    assert json.loads(path.read_text())["overheads"]["decode_step_s"] == 0.004
    assert read_profile(path).overheads == OVH and load_overheads(path) == OVH
    doc = json.loads(path.read_text())
    del doc["overheads"]
    path.write_text(json.dumps(doc))
    assert read_profile(path).overheads is None and load_overheads(path) == Overheads()
    doc["overheads"] = {"request_s": 0.02}  # keys left out are zero
    path.write_text(json.dumps(doc))
    assert load_overheads(path) == Overheads(request_s=0.02)


@pytest.mark.parametrize(("value", "message"), [
    ({"request_s": -1}, "overheads.request_s"),
    ({"request_s": "fast"}, "overheads.request_s"),
    ({"per_token_s": 0.1}, "unknown keys"),
    ([0.1], "expected an object"),
])
def test_bad_overheads_in_a_profile_name_the_field(tmp_path: Path, value: object, message: str) -> None:
    path = _profile(tmp_path, None)
    doc = json.loads(path.read_text())
    doc["overheads"] = value
    path.write_text(json.dumps(doc))
    with pytest.raises(ProfileFormatError, match=message):
        read_profile(path)


def test_a_profile_spec_applies_the_stored_overheads_to_the_simulated_cluster(tmp_path: Path) -> None:
    from simulations.experiments.specs import ClusterKnobs, Placement, build_cluster, load_latency

    spec = f"profile:{_profile(tmp_path, OVH)}"
    with_ovh = load_latency(spec, kv_bytes_per_token=1024.0)
    shape = BatchShape(decode_requests=2, decode_context_tokens=200)
    base_s = read_profile(tmp_path / "profile.json").fitted().model.step_time_s(shape)
    assert with_ovh.model.step_time_s(shape) == pytest.approx(base_s + OVH.decode_step_s)
    cluster = build_cluster(Placement(prefill=1, decode=1), with_ovh, ClusterKnobs())
    assert cluster.request_overhead_s == OVH.request_s
    assert cluster.links.transfer_latency_s == OVH.handoff_s

    bare = build_cluster(Placement(prefill=1, decode=1), load_latency(f"profile:{_profile(tmp_path, None)}"),
                         ClusterKnobs())
    assert bare.request_overhead_s == 0.0 and bare.links.transfer_latency_s == 0.0
