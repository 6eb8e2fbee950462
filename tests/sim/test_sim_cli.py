"""`pdserve simulate` and `pdserve goodput` end to end on a small Azure-format trace."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from orchestrator.cli import main


@pytest.fixture()
def azure_csv(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "mini_conv.csv"
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    t_us = 0
    for _ in range(300):
        t_us += int(rng.exponential(0.25) * 1e6)
        s, us = divmod(t_us, 1_000_000)
        lines.append(f"2023-11-16 18:{s // 60:02d}:{s % 60:02d}.{us:06d}0,{rng.integers(20, 800)},{rng.integers(1, 400)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _simulate(trace: Path, out: Path, *extra: str) -> int:
    return main(["simulate", "--trace", str(trace), "--out", str(out), "--latency", "roofline:a100-80gb:llama-2-13b",
                 *extra])


def test_simulate_writes_summary_csv_and_plots(azure_csv: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert _simulate(azure_csv, out, "--setup", "disagg", "--prefill", "1", "--decode", "1") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["requests"] == 300 and summary["finished"] + summary["rejected"] == 300
    assert 0.0 <= summary["slo"]["attainment"] <= 1.0
    assert summary["cluster"] == "1P(tp1)+1D(tp1)" and summary["kv_bytes_moved"] > 0
    rows = (out / "requests.csv").read_text().splitlines()
    assert len(rows) == 301 and rows[0].startswith("request,arrival_s")
    for png in ("latency_cdf.png", "utilisation.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "SLO attainment" in capsys.readouterr().out


def test_simulate_is_byte_identical_for_a_seed(azure_csv: Path, tmp_path: Path) -> None:
    outputs = []
    for run, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        out = tmp_path / run
        assert _simulate(azure_csv, out, "--setup", "colocated", "--colocated", "1", "--sample", "150",
                         "--seed", seed, "--rate-scale", "2", "--no-plots") == 0
        outputs.append((out / "summary.json").read_bytes() + (out / "requests.csv").read_bytes())
    assert outputs[0] == outputs[1]
    assert outputs[0] != outputs[2]


def test_simulate_router_refresh_flag_reaches_the_cluster(azure_csv: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    outputs = {}
    for name, extra in (("default", ()), ("live", ("--router-refresh-s", "0.2")), ("exact", ("--router-refresh-s", "0"))):
        out = tmp_path / name
        assert _simulate(azure_csv, out, "--prefill", "2", "--decode", "2", "--rate-scale", "8", "--no-plots",
                         *extra) == 0
        outputs[name] = (out / "requests.csv").read_bytes()
    assert outputs["default"] == outputs["live"] != outputs["exact"]
    assert _simulate(azure_csv, tmp_path / "bad", "--router-refresh-s", "-1") == 2
    assert "router_refresh_s" in capsys.readouterr().err


def test_simulate_reports_bad_input_clearly(azure_csv: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert _simulate(azure_csv, tmp_path / "x", "--latency", "roofline:a100-80gb") == 2
    assert "roofline:GPU:MODEL" in capsys.readouterr().err
    assert main(["simulate", "--trace", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "y")]) == 2


@pytest.mark.slow
def test_goodput_search_writes_table_and_plots(azure_csv: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "gp"
    code = main(["goodput", "--trace", str(azure_csv), "--gpus", "2", "--tp", "1", "--limit", "150",
                 "--tolerance", "0.1", "--out", str(out)])
    assert code == 0
    doc = json.loads((out / "goodput.json").read_text())
    labels = {p["placement"] for p in doc["placements"]}
    assert labels == {"2C(tp1)", "1P(tp1)+1D(tp1)"}
    assert all(p["goodput_rps"] > 0 and p["points"] for p in doc["placements"])
    for png in ("goodput_per_gpu.png", "attainment_vs_rate.png", "latency_cdf.png"):
        assert (out / png).stat().st_size > 1000
    assert "| placement | GPUs |" in capsys.readouterr().out
