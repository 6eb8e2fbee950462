"""Token gaps (TBT) account for every token after the first, preemption stalls included."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from orchestrator.cli import main

HEAD40 = Path(__file__).resolve().parents[1] / "data" / "traces" / "azure_conv_head40.csv"


def _run(trace: Path, out: Path, *extra: str) -> tuple[dict[str, float], list[dict[str, str]]]:
    code = main(["simulate", "--trace", str(trace), "--out", str(out), "--latency", "fixed:0.01", "--no-plots",
                 *extra])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    with open(out / "requests.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return summary, rows


@pytest.mark.parametrize("setup", [
    ("--setup", "colocated", "--colocated", "1", "--policy", "prefill_first"),
    ("--setup", "colocated", "--colocated", "1", "--policy", "chunked"),
    ("--setup", "disagg", "--short-prompt-tokens", "0"),
])
def test_gaps_sum_to_decode_time_even_with_preemptions(setup: tuple[str, ...], tmp_path: Path) -> None:
    summary, rows = _run(HEAD40, tmp_path / "run", "--kv-blocks", "200", "--rate-scale", "3", *setup)
    assert summary["preemptions"] > 0  # the case under test
    done = [r for r in rows if r["status"] == "finished"]
    tbt = summary["tbt_s"]
    # Every token after a request's first has exactly one gap, and the gaps fill e2e - TTFT.
    assert tbt["count"] == sum(int(r["output_tokens"]) - 1 for r in done)
    decode_s = sum(float(r["e2e_s"]) - float(r["ttft_s"]) for r in done)
    assert tbt["mean"] * tbt["count"] == pytest.approx(decode_s, abs=1e-5 * len(done))


def test_a_preemption_stall_is_one_token_gap(tmp_path: Path) -> None:
    trace = tmp_path / "pair.csv"
    # Two 16-token prompts of 100 tokens each cannot both fit in 10 blocks of 16: one is recomputed.
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                     "2023-11-16 18:00:00.0,16,100\n2023-11-16 18:00:00.0,16,100\n")
    summary, rows = _run(trace, tmp_path / "run", "--setup", "colocated", "--colocated", "1", "--kv-blocks", "10")
    assert summary["preemptions"] == 1 and summary["tbt_s"]["count"] == 198
    # The victim's last token came at 0.65 s and its recompute ended at 1.02 s.
    assert summary["tbt_s"]["max"] == pytest.approx(0.37)
    assert [float(r["e2e_s"]) for r in rows] == pytest.approx([1.01, 1.37])
