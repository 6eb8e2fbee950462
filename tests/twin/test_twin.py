"""The twin check, small: a 16-request Azure conversation slice through the live 1P+1D system and the simulator.

What is asserted, and why these bounds (2-core machine shared with other work):

- both sides finish every request (the live one with exactly the planned
  output lengths): a lost or failed request is a bug on either side, never
  noise;
- the serving overheads fitted on the probes (requests sent one at a time,
  alone and beside one long decode) are there: some request overhead (HTTP,
  routing, two gRPC calls: tens of ms measured, > 5 ms asserted) and some
  overhead in the decode phase, hand-off plus per step (how twelve probes
  split it between the two moves with the machine's load: two loaded runs
  put all of it, 6-8 ms, in the hand-off and none per step);
- on the probes themselves the simulator with overheads is within 30% of
  live at p50 TTFT and TPOT (it was fitted there, but on medians per term,
  so the p50s of the mix need not land exactly: -3% to +19% seen; the bare
  simulator read 23-70% low on the same probes);
- on the slice, which the fit never saw, the mean of |error| over p50 TTFT,
  p50 TPOT and mean e2e is at most 50% and at most 0.8x the bare simulator's
  in the same run, so the bare simulator always fails it (it has no HTTP,
  gRPC, hand-off or streaming cost: 34-65% in every run measured). With
  overheads it was 10-41% (higher when the slice meets more or less CPU
  contention than the probes a few seconds earlier, which the simulator does
  not model; 41% against 65% bare in one CI run, so the bound is relative).

The reported errors are printed: ``benchmarks/twin.py`` gives the full table.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from simulations.latency.profile import read_profile

ROOT = Path(__file__).resolve().parents[2]


def _load_twin() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pdserve_bench_twin", ROOT / "benchmarks" / "twin.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


twin = _load_twin()

# The decode cells take the default 8 timed steps (min of them): with 4, a run under a load average of 2.2
# fitted no decode-phase overhead at all, live decode no slower than the profile; more steps make it less
# likely that a busy stretch of the machine slows every timed step of a cell (same test time here).
SMALL_GRID = twin.ProfileGrid(
    prefill_lengths=(16, 128, 256, 512), decode_batches=(1, 4, 12), decode_contexts=(64, 512),
    repeats=2, warmup_steps=1, decode_steps=8,
)


def test_slice_becomes_the_same_trace() -> None:
    """The simulator's trace holds exactly the planned send times and clipped lengths."""
    config = twin.TwinConfig(requests=16)
    requests = twin.plan(config)
    trace = twin.as_trace("azure-conv", requests)
    assert len(trace) == 16
    assert trace.arrival_s.tolist() == [r.send_at_s for r in requests]
    assert trace.prompt_tokens.tolist() == [r.prompt_tokens for r in requests]
    assert trace.output_tokens.tolist() == [r.max_tokens for r in requests]
    assert max(trace.prompt_tokens) <= config.max_prompt_tokens
    assert max(trace.output_tokens) <= config.max_output_tokens


def test_relative_errors_are_signed_against_live() -> None:
    """Error is (sim - live) / live; a metric missing on a side is left out."""
    d = twin.Distribution(count=1, mean_s=2.0, p50_s=1.0, p90_s=4.0, p99_s=4.0)
    half = twin.Distribution(count=1, mean_s=1.0, p50_s=0.5, p90_s=6.0, p99_s=6.0)
    live = twin.SideResult(1, 1, d, d, d, 0.0)
    sim = twin.SideResult(1, 1, half, None, half, 0.0)
    errors = twin.relative_errors(live, sim)
    assert errors == {"ttft_p50": -0.5, "ttft_p90": 0.5, "e2e_mean": -0.5}


def test_probes_become_bench_requests_in_plan_order() -> None:
    sent, plan = twin.probe_requests(4, 3)
    assert len(sent) == len(plan) == 8
    assert [(r.index, r.send_at_s, r.prompt_tokens, r.max_tokens) for r in sent] == [
        (i, p.at_s, p.prompt_tokens, p.output_tokens) for i, p in enumerate(plan)]


def test_calibration_pairs_live_and_simulated_probes_by_batch() -> None:
    """Probes beside the background request decode at batch 2; it and failed probes are left out."""
    sent, plan = twin.probe_requests(2, 2)
    lat = twin.RequestLatency

    def live(i: int) -> object:
        if i == 1:
            return None
        return lat(0.05, 0.05 + 0.004 * (plan[i].output_tokens - 1) * plan[i].decode_batch, plan[i].output_tokens)

    bare = [lat(0.02, 0.02, p.output_tokens) for p in plan]  # no decode time at all: the gap is all overhead
    fitted = twin.calibrate(plan, [live(i) for i in range(len(plan))], bare)
    assert fitted.request_s == pytest.approx(0.03)
    assert fitted.decode_step_s + 2 * fitted.decode_token_s == pytest.approx(0.008)
    with pytest.raises(RuntimeError, match="nothing to calibrate"):
        twin.calibrate(plan, [None] * len(plan), bare)


@pytest.mark.slow
def test_twin_small_slice(twin_ray: None, tiny_model_dir: Path, tmp_path: Path) -> None:
    """Profile, probe, calibrate, simulate and serve 16 requests; see the module docstring for the bounds.

    Six probes and a 16-request slice on a shared 2-core machine are noisy: the same code missed a
    bound in about one run of four (the fitted per-request decode overhead swung 1.2-2.8 ms between
    runs). A run that misses one is repeated once, from scratch; the second must meet every bound.
    """
    config = twin.TwinConfig(requests=16, grid=SMALL_GRID, model_dir=tiny_model_dir, warmup_requests=2,
                             idle_requests=6, busy_requests=6)
    try:
        _run_small_slice(config, tmp_path / "first")
    except AssertionError as missed:
        print(f"\nfirst run missed a bound ({missed}); running again")
        _run_small_slice(config, tmp_path / "second")


def _run_small_slice(config: twin.TwinConfig, tmp_path: Path) -> None:
    """One twin run of ``config`` and its bounds (AssertionError on a miss)."""
    tmp_path.mkdir()
    report = twin.run_twin(config, tmp_path)
    print("\n" + twin.format_table(report))

    assert report.live.num_ok == report.live.num_requests == 16
    assert report.sim.num_ok == report.sim.num_requests == 16
    assert report.bare_sim is not None and report.bare_sim.num_ok == 16
    assert report.settings["deployed"]["short_outputs"] == []
    assert report.settings["deployed"]["num_kv_blocks"] == config.num_kv_blocks
    assert report.settings["deployed"]["max_num_seqs"] == report.settings["max_num_seqs"]
    # The simulated instances have the shapes the live workers report of their engines.
    expected = {"total_kv_blocks": config.num_kv_blocks, "block_size": report.settings["block_size"],
                "max_running_requests": report.settings["max_num_seqs"]}
    assert report.settings["deployed"]["instances"] == {"prefill": expected, "decode": expected}

    # The fitted overheads are stored in the profile the run leaves behind.
    overheads = report.overheads
    assert overheads is not None
    assert read_profile(tmp_path / "twin-profile.json").overheads == overheads
    assert overheads.request_s > 0.005
    shortest_decode = 7  # steps after the first token of the probes' shortest output (8 tokens)
    assert overheads.handoff_s + shortest_decode * (overheads.decode_step_s + overheads.decode_token_s) > 0.0

    assert report.idle_live is not None and report.idle_live.num_ok == 12
    for metric in ("ttft_p50", "tpot_p50"):
        assert abs(report.idle_errors[metric]) <= 0.30, f"probe {metric} error {report.idle_errors[metric]:+.0%}"

    keys = ("ttft_p50", "tpot_p50", "e2e_mean")
    calibrated = sum(abs(report.errors[k]) for k in keys) / len(keys)
    bare = sum(abs(report.bare_errors[k]) for k in keys) / len(keys)
    assert calibrated <= 0.5, f"slice mean |error| {calibrated:.0%} with overheads (bare {bare:.0%})"
    assert calibrated <= 0.8 * bare, f"slice mean |error| {calibrated:.0%} with overheads, bare {bare:.0%}"
