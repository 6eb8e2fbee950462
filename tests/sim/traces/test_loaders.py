"""Each loader on the real shared traces and on the committed samples."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from simulations.traces import (
    TraceFormat,
    detect_format,
    load_azure_csv,
    load_burstgpt_csv,
    load_mooncake_jsonl,
    load_trace,
)


@pytest.mark.parametrize(
    ("name", "rows", "span_s", "mean_prompt", "mean_output"),
    [("azure-conv", 19_366, 3_502, 1155, 211), ("azure-code", 8_819, 3_436, 2048, 27.9)],
)
def test_azure_2023_real(
    shared_traces: Path, name: str, rows: int, span_s: float, mean_prompt: float, mean_output: float
) -> None:
    trace = load_trace(name)
    assert len(trace) == rows
    assert trace.name == name
    assert trace.arrival_s[0] == 0.0
    assert trace.duration_s == pytest.approx(span_s, abs=1.0)
    assert trace.prompt_tokens.mean() == pytest.approx(mean_prompt, rel=0.01)
    assert trace.output_tokens.mean() == pytest.approx(mean_output, rel=0.01)
    assert trace.hash_ids is None


def test_azure_2023_sample_keeps_sub_microsecond_digits(data_dir: Path) -> None:
    trace = load_azure_csv(data_dir / "azure_conv_head40.csv")
    assert len(trace) == 40
    # rows 1 and 2: 18:15:46.6805900 and 18:15:50.9951690
    assert trace.arrival_s[1] == pytest.approx(4.314579, abs=1e-7)
    assert (trace.prompt_tokens[0], trace.output_tokens[0]) == (374, 44)


def test_azure_2024_mixed_fraction_and_zone(data_dir: Path) -> None:
    trace = load_trace(data_dir / "azure2024_format_synthetic.csv")
    assert len(trace) == 20
    assert trace.arrival_s[0] == 0.0
    assert trace.arrival_s[1] == pytest.approx(0.721905, abs=1e-9)  # first row has no fraction
    assert bool(np.all(np.diff(trace.arrival_s) >= 0))


def test_azure_zone_offsets_are_applied(tmp_path: Path) -> None:
    path = tmp_path / "zones.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2024-05-12 02:00:00+02:00,10,1\n"  # 00:00 UTC
        "2024-05-12 00:00:01.5Z,20,2\n"
        "2024-05-11 19:00:03-05:00,30,3\n"  # 00:00:03 UTC
    )
    trace = load_azure_csv(path)
    np.testing.assert_allclose(trace.arrival_s, [0.0, 1.5, 3.0])


@pytest.mark.parametrize(
    ("file", "rows", "mean_prompt"), [("conversation", 12_031, 12_035), ("synthetic", 3_993, 15_325)]
)
def test_mooncake_real(shared_traces: Path, file: str, rows: int, mean_prompt: float) -> None:
    trace = load_mooncake_jsonl(shared_traces / "mooncake_fast25" / f"{file}_trace.jsonl")
    assert len(trace) == rows
    assert trace.prompt_tokens.mean() == pytest.approx(mean_prompt, abs=1)
    assert trace.hash_ids is not None
    assert all(len(h) == math.ceil(p / 512) for h, p in zip(trace.hash_ids, trace.prompt_tokens, strict=True))


def test_mooncake_sample_names_and_ms(data_dir: Path) -> None:
    trace = load_trace(data_dir / "mooncake_conv_head25.jsonl")
    assert len(trace) == 25
    assert trace.hash_ids is not None and trace.hash_ids[0][:3] == (0, 1, 2)
    assert trace.prompt_tokens[0] == 6758 and trace.output_tokens[0] == 500


def test_mooncake_named_traces(shared_traces: Path) -> None:
    assert len(load_trace("mooncake-conv")) == 12_031
    assert len(load_trace("mooncake-synthetic")) == 3_993


def test_burstgpt_failures_flagged_or_dropped(data_dir: Path) -> None:
    path = data_dir / "burstgpt_v1_synthetic.csv"
    assert detect_format(path) is TraceFormat.BURSTGPT
    trace = load_burstgpt_csv(path)
    assert len(trace) == 30
    assert trace.failed is not None
    assert int(trace.failed.sum()) == 3
    assert bool(np.all(trace.output_tokens[trace.failed] == 0))
    assert (trace.arrival_s[1], trace.prompt_tokens[1], trace.output_tokens[1]) == (40.0, 1087, 230)
    kept = load_trace(path, drop_failed=True)
    assert len(kept) == 27 and kept.failed is not None and not kept.failed.any()
    gpt4 = load_burstgpt_csv(path, model="GPT-4")
    assert 0 < len(gpt4) < len(trace)


def test_burstgpt_newer_schema(data_dir: Path) -> None:
    trace = load_trace(data_dir / "burstgpt_v2_synthetic.csv")
    assert len(trace) == 15
    assert trace.failed is not None and int(trace.failed.sum()) == 2


def test_unsorted_rows_are_stably_sorted(tmp_path: Path) -> None:
    path = tmp_path / "unsorted.jsonl"
    path.write_text(
        '{"timestamp": 2000, "input_length": 3, "output_length": 1, "hash_ids": [9]}\n'
        '{"timestamp": 1000, "input_length": 1, "output_length": 1, "hash_ids": [7]}\n'
        '{"timestamp": 2000, "input_length": 4, "output_length": 1, "hash_ids": [8]}\n'
    )
    trace = load_trace(path)
    np.testing.assert_allclose(trace.arrival_s, [0.0, 1.0, 1.0])
    assert trace.prompt_tokens.tolist() == [1, 3, 4]
    assert trace.hash_ids == ((7,), (9,), (8,))


def test_unknown_name_lists_shipped_names() -> None:
    with pytest.raises(FileNotFoundError, match="azure-conv"):
        load_trace("no-such-trace")


def test_traces_dir_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> None:
    folder = tmp_path / "azure_llm_2023"
    folder.mkdir()
    (folder / "AzureLLMInferenceTrace_conv.csv").write_text((data_dir / "azure_conv_head40.csv").read_text())
    monkeypatch.setenv("PDSERVE_TRACES_DIR", str(tmp_path))
    assert len(load_trace("azure-conv")) == 40
