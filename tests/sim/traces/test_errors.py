"""Malformed trace files raise TraceFormatError naming file, line and field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from simulations.traces import TraceFormatError, load_trace
from simulations.traces.servegen import load_servegen_clients

AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
GOOD_ROW = "2023-11-16 18:15:46.6805900,374,44\n"


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _error(path: Path, **options: Any) -> TraceFormatError:
    with pytest.raises(TraceFormatError) as info:
        load_trace(path, **options)
    assert str(path) in str(info.value)
    return info.value


def test_non_numeric_context_tokens_on_line_17(tmp_path: Path) -> None:
    path = _write(
        tmp_path, "a.csv", AZURE_HEADER + GOOD_ROW * 15 + "2023-11-16 18:15:47.1,abc,3\n" + GOOD_ROW
    )
    err = _error(path)
    assert (err.line, err.field) == (17, "ContextTokens")
    assert f"{path}:17" in str(err) and "abc" in str(err)


def test_negative_length(tmp_path: Path) -> None:
    err = _error(_write(tmp_path, "a.csv", AZURE_HEADER + GOOD_ROW + "2023-11-16 18:15:47.1,5,-3\n"))
    assert (err.line, err.field) == (3, "GeneratedTokens")


def test_bad_timestamp(tmp_path: Path) -> None:
    err = _error(_write(tmp_path, "a.csv", AZURE_HEADER + GOOD_ROW + GOOD_ROW + "yesterday,5,3\n"))
    assert (err.line, err.field) == (4, "TIMESTAMP")


def test_wrong_column_count(tmp_path: Path) -> None:
    err = _error(_write(tmp_path, "a.csv", AZURE_HEADER + GOOD_ROW + "2023-11-16 18:15:47.1,5\n"))
    assert err.line == 3 and "3" in str(err)


def test_missing_header_column(tmp_path: Path) -> None:
    err = _error(
        _write(tmp_path, "a.csv", "TIMESTAMP,ContextTokens\n2023-11-16 18:15:47.1,5\n"), format="azure"
    )
    assert err.line == 1 and "GeneratedTokens" in str(err)


def test_unknown_format(tmp_path: Path) -> None:
    err = _error(_write(tmp_path, "a.csv", "x,y\n1,2\n"))
    assert err.line == 1


def test_mooncake_missing_field(tmp_path: Path) -> None:
    good = '{"timestamp": 0, "input_length": 3, "output_length": 1, "hash_ids": [0]}\n'
    err = _error(_write(tmp_path, "m.jsonl", good + '{"timestamp": 5, "input_length": 3, "hash_ids": [0]}\n'))
    assert (err.line, err.field) == (2, "output_length")


def test_mooncake_bad_values(tmp_path: Path) -> None:
    good = '{"timestamp": 0, "input_length": 3, "output_length": 1, "hash_ids": [0]}\n'
    cases = [
        ('{"timestamp": "soon", "input_length": 3, "output_length": 1, "hash_ids": []}', "timestamp"),
        ('{"timestamp": 1, "input_length": -3, "output_length": 1, "hash_ids": []}', "input_length"),
        ('{"timestamp": 1, "input_length": 3, "output_length": 1, "hash_ids": "abc"}', "hash_ids"),
        ('{"timestamp": 1, "input_length": 3.5, "output_length": 1, "hash_ids": []}', "input_length"),
    ]
    for k, (row, field) in enumerate(cases):
        err = _error(_write(tmp_path, f"m{k}.jsonl", good + good + row + "\n"))
        assert (err.line, err.field) == (3, field)


def test_mooncake_invalid_json(tmp_path: Path) -> None:
    good = '{"timestamp": 0, "input_length": 3, "output_length": 1, "hash_ids": [0]}\n'
    err = _error(_write(tmp_path, "m.jsonl", good + '{"timestamp": 0, "input_length": \n'), format="mooncake")
    assert err.line == 2


def test_burstgpt_non_numeric_timestamp(tmp_path: Path) -> None:
    text = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n5,ChatGPT,4,1,5,API log\nnoon,ChatGPT,4,1,5,API log\n"
    err = _error(_write(tmp_path, "b.csv", text))
    assert (err.line, err.field) == (3, "Timestamp")


def test_servegen_bad_rate_and_pattern(tmp_path: Path) -> None:
    (tmp_path / "chunk-0-trace.csv").write_text("0,1.0,1.0,Gamma,1.0,1.0\n600,fast,1.0,Gamma,1.0,1.0\n")
    with pytest.raises(TraceFormatError) as info:
        load_servegen_clients(tmp_path)
    assert (info.value.line, info.value.field) == (2, "rate")
    (tmp_path / "chunk-0-trace.csv").write_text("0,1.0,1.0,Pareto,1.0,1.0\n")
    with pytest.raises(TraceFormatError, match="Pareto"):
        load_servegen_clients(tmp_path)


def test_servegen_bad_pdf(tmp_path: Path) -> None:
    (tmp_path / "chunk-0-trace.csv").write_text("0,1.0,1.0,Gamma,1.0,1.0\n")
    (tmp_path / "chunk-0-dataset.json").write_text(
        '{"0": {"input_tokens": "{10: oops}", "output_tokens": "{1: 1.0}"}}'
    )
    with pytest.raises(TraceFormatError) as info:
        load_servegen_clients(tmp_path)
    assert info.value.field == "input_tokens"


def test_blank_lines_and_crlf_keep_true_line_numbers(tmp_path: Path) -> None:
    text = AZURE_HEADER + GOOD_ROW + "\n" + GOOD_ROW + "2023-11-16 18:15:47.1,x,3\n"
    err = _error(_write(tmp_path, "a.csv", text))
    assert (err.line, err.field) == (5, "ContextTokens")
    crlf = (AZURE_HEADER + GOOD_ROW * 3).replace("\n", "\r\n")
    assert len(load_trace(_write(tmp_path, "b.csv", crlf))) == 3
