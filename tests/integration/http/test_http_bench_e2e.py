"""`pdserve bench` end to end: a 20-request slice of the Azure conversation trace against the live server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from http_live_support import LiveServer

from orchestrator.cli import main as pdserve

AZURE_CONV = Path("/work/shared/traces/azure_llm_2023/AzureLLMInferenceTrace_conv.csv")


@pytest.mark.slow
def test_bench_replays_azure_conv_slice(live: LiveServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if not AZURE_CONV.is_file():
        pytest.skip(f"{AZURE_CONV} is not on this machine")
    out = tmp_path / "bench"
    rc = pdserve([
        "bench", "--trace", str(AZURE_CONV), "--url", live.url, "--limit", "20", "--rate-scale", "4",
        "--max-prompt-tokens", "96", "--max-output-tokens", "12", "--ttft-slo", "5", "--tpot-slo", "1",
        "--timeout", "120", "--out", str(out), "--no-progress", "--slo-class", "bench-e2e",
    ])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "TTFT" in printed and "SLO attainment" in printed

    doc = json.loads((out / "bench.json").read_text())
    rows = doc["requests"]
    assert [r["index"] for r in rows] == list(range(20))  # every request accounted for
    assert all(r["outcome"] == "ok" for r in rows), [r["error"] for r in rows if r["outcome"] != "ok"]
    assert doc["config"]["model"] == "tiny-llama"
    assert doc["summary"]["num_requests"] == 20 and doc["summary"]["num_ok"] == 20
    for row in rows:
        assert row["output_tokens"] == row["max_tokens"] <= 12  # ignore_eos gave the trace's (clipped) length
        assert row["prompt_tokens"] <= 96 and row["ttft_s"] <= row["e2e_s"]
    # arrivals followed the trace: the first 20 Azure conv requests span ~13 s, scaled by 4
    assert 2.5 < max(r["scheduled_s"] for r in rows) < 4.0
    # the server saw exactly these 20 requests under the bench's SLO class
    e2e_count = live.metrics.registry.get_sample_value(
        "pdserve_e2e_request_latency_seconds_count", {"slo_class": "bench-e2e"})
    assert e2e_count == 20
    png = (out / "bench_cdf.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
