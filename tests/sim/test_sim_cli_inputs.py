"""`pdserve simulate` and `pdserve goodput` on bad or degenerate input: clean errors, honest reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.cli import main
from simulations.experiments.specs import load_workload
from simulations.traces import traces_dir

DATA = Path(__file__).resolve().parents[1] / "data" / "traces"
HEAD40 = DATA / "azure_conv_head40.csv"


def _shared(relative: str) -> Path:
    path = traces_dir() / relative
    if not path.is_file():
        pytest.skip(f"shared real trace not present at {path}")
    return path


def test_goodput_sample_is_not_cut_by_a_hidden_limit(tmp_path: Path) -> None:
    conv = _shared("azure_llm_2023/AzureLLMInferenceTrace_conv.csv")
    out = tmp_path / "gp"
    assert main(["goodput", "--trace", str(conv), "--sample", "2100", "--gpus", "1", "--tp", "1",
                 "--setups", "colocated", "--latency", "fixed:0.001", "--tolerance", "0.5", "--out", str(out)]) == 0
    doc = json.loads((out / "goodput.json").read_text())
    assert doc["requests"] == 2100 and doc["trace"].endswith("~2100")


def test_goodput_help_documents_its_default_limit(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["goodput", "--help"])
    assert "default: 2000 when neither --limit nor --sample" in " ".join(capsys.readouterr().out.split())


def test_a_sample_cut_by_limit_is_named_after_its_rows() -> None:
    conv = _shared("azure_llm_2023/AzureLLMInferenceTrace_conv.csv")
    trace = load_workload(str(conv), limit=50, sample=300, seed=1)
    assert len(trace) == 50 and trace.name.endswith("~50")


def _simulate(tmp_path: Path, *extra: str) -> int:
    return main(["simulate", "--trace", str(HEAD40), "--out", str(tmp_path / "run"), "--no-plots", *extra])


@pytest.mark.parametrize("flag", ["--max-running", "--max-batched-tokens", "--kv-blocks", "--block-size",
                                  "--gpus-per-node", "--tp", "--prefill-tp", "--decode", "--prefill"])
def test_simulate_rejects_zero_sized_knobs_cleanly(flag: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert _simulate(tmp_path, flag, "0") == 2
    assert f"{flag} must be >= 1" in capsys.readouterr().err


def test_simulate_rejects_zero_colocated_instances(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _simulate(tmp_path, "--setup", "colocated", "--colocated", "0") == 2
    assert "--colocated must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize(("extra", "message"), [
    (("--max-running", "0"), "--max-running must be >= 1"),
    (("--block-size", "0"), "--block-size must be >= 1"),
    (("--kv-blocks", "0"), "--kv-blocks must be >= 1"),
    (("--tolerance", "0"), "--tolerance must be in (0, 1)"),
    (("--limit", "1"), "needs >= 2 requests spread over time"),
])
def test_goodput_rejects_bad_knobs_before_searching(extra: tuple[str, ...], message: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["goodput", "--trace", str(HEAD40), "--gpus", "1", "--tp", "1", "--out", str(tmp_path / "gp"),
                 *extra])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "gp").exists()


def test_goodput_rejects_a_trace_whose_requests_all_arrive_at_once(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    mooncake = DATA / "mooncake_conv_head25.jsonl"
    code = main(["goodput", "--trace", str(mooncake), "--limit", "3", "--out", str(tmp_path / "gp")])
    assert code == 2 and "spread over time" in capsys.readouterr().err


@pytest.mark.parametrize(("extra", "message"), [
    (("--sample", "0"), "--sample must be >= 1"),
    (("--limit", "0"), "--limit must be >= 1"),
    ((), "has no requests to simulate"),  # a header-only CSV
])
def test_simulate_refuses_an_empty_workload(extra: tuple[str, ...], message: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    trace = HEAD40
    if not extra:
        trace = tmp_path / "empty.csv"
        trace.write_text(HEAD40.read_text().splitlines()[0] + "\n")
    code = main(["simulate", "--trace", str(trace), "--out", str(tmp_path / "run"), "--no-plots", *extra])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_nothing_finished_reports_latencies_as_absent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # One KV block holds no prompt of this trace: every request is rejected.
    assert _simulate(tmp_path, "--latency", "fixed:0.01", "--kv-blocks", "1") == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["finished"] == 0 and summary["rejected"] == 40
    for key in ("ttft_s", "tpot_s", "e2e_s", "tbt_s"):
        assert summary[key]["p50"] is None and summary[key]["max"] is None
    assert summary["tbt_s"]["count"] == 0
    assert "TTFT p50/p90/p99 -/-/- s" in capsys.readouterr().out


def test_rows_that_never_ran_are_not_simulated(tmp_path: Path) -> None:
    # BurstGPT marks failed requests with zero response tokens; a zero-token prompt is no request either:
    # simulated, each would count as a fast success
    burst = DATA / "burstgpt_v1_synthetic.csv"
    lines = burst.read_text().splitlines()
    failed = sum(1 for line in lines[1:] if line.split(",")[3] == "0")
    assert failed > 0
    trace = load_workload(str(burst))
    assert len(trace) == len(lines) - 1 - failed
    assert (trace.prompt_tokens > 0).all() and (trace.output_tokens > 0).all()
    empty_prompt = tmp_path / "burst.csv"
    empty_prompt.write_text("\n".join([lines[0], "1,ChatGPT,0,12,12,Conversation log", *lines[1:]]) + "\n")
    assert len(load_workload(str(empty_prompt))) == len(trace)


def test_servegen_generation_follows_the_seed() -> None:
    sample = str(DATA / "servegen_sample")
    first, again, other = (load_workload(sample, limit=200, seed=s) for s in (0, 0, 7))
    assert (first.arrival_s == again.arrival_s).all()
    assert len(first) == len(other) == 200 and not (first.arrival_s == other.arrival_s).all()
