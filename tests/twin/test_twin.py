"""The twin check, small: a 16-request Azure conversation slice through the live 1P+1D system and the simulator.

What is asserted, and why these bounds (2-core machine shared with other work):

- both sides finish every request (the live one with exactly the planned
  output lengths): a lost or failed request is a bug on either side, never
  noise;
- the simulated p50 TPOT is between 1/5 and 3 times the live one. The
  profile is the engine's own step time taken alone (``min`` of repeats),
  while the live decode worker shares two cores with the prefill worker, the
  router, this client and anything else running, and pays gRPC, streaming
  and engine-loop overheads per token that the simulator does not model; so
  the simulator reads low, by how much depending on the machine's load.
  Observed (sim/live p50 TPOT): 0.60-0.71 in three 40-request runs of
  ``benchmarks/twin.py`` at 1-min load averages 3-6 on 2 CPUs, 0.85 in this
  test at 5.5, and 0.34 in this test when the load reached 9.5; the idle
  probe once read 1.47, when the profile itself was taken under load. Hence
  the lopsided bounds: wide enough for a loaded machine, still failing when
  the profile, the batching policy or the decode cost model is off by an
  order of magnitude (say, a profile in milliseconds read as seconds);
- simulated p50 TTFT is positive and below live p50 TTFT + 1 s: the
  simulator has no HTTP or router overhead, so it should not be much slower
  than live; only an order-of-magnitude error trips this.

The reported errors, not these asserts, are the point: the script prints them.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_twin() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pdserve_bench_twin", ROOT / "benchmarks" / "twin.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


twin = _load_twin()

SMALL_GRID = twin.ProfileGrid(
    prefill_lengths=(16, 128, 256, 512), decode_batches=(1, 4, 12), decode_contexts=(64, 512),
    repeats=2, warmup_steps=1, decode_steps=4,
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


@pytest.mark.slow
def test_twin_small_slice(twin_ray: None, tiny_model_dir: Path, tmp_path: Path) -> None:
    """Profile, simulate and serve 16 requests; see the module docstring for the bounds."""
    config = twin.TwinConfig(requests=16, grid=SMALL_GRID, model_dir=tiny_model_dir, warmup_requests=2)
    report = twin.run_twin(config, tmp_path)
    print("\n" + twin.format_table(report))

    assert (tmp_path / "twin-profile.json").is_file()
    assert report.live.num_ok == report.live.num_requests == 16
    assert report.sim.num_ok == report.sim.num_requests == 16
    assert report.settings["deployed"]["short_outputs"] == []
    assert report.settings["deployed"]["num_kv_blocks"] == config.num_kv_blocks
    assert report.settings["deployed"]["max_num_seqs"] == report.settings["max_num_seqs"]
    # The simulated instances have the shapes the live workers report of their engines.
    expected = {"total_kv_blocks": config.num_kv_blocks, "block_size": report.settings["block_size"],
                "max_running_requests": report.settings["max_num_seqs"]}
    assert report.settings["deployed"]["instances"] == {"prefill": expected, "decode": expected}

    assert report.live.tpot is not None and report.sim.tpot is not None
    ratio = report.sim.tpot.p50_s / report.live.tpot.p50_s
    assert 1 / 5 <= ratio <= 3, f"simulated p50 TPOT is {ratio:.2f}x live"
    assert report.live.ttft is not None and report.sim.ttft is not None
    assert 0 < report.sim.ttft.p50_s < report.live.ttft.p50_s + 1.0
