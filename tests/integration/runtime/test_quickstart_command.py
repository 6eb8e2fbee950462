"""`pdserve quickstart --out DIR` on the session's Ray: writes the report and the CDF plot its --help promises."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from orchestrator.commands import quickstart

pytestmark = pytest.mark.slow


def test_quickstart_out_writes_bench_json_and_the_cdf_plot(ray_session: None, tiny_model_dir: Path,
                                                           tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    quickstart.add_arguments(parser)
    out = tmp_path / "qs"
    args = parser.parse_args(["--requests", "2", "--rate-scale", "100", "--max-prompt-tokens", "32",
                              "--max-output-tokens", "2", "--cache-dir", str(tiny_model_dir.parent),
                              "--out", str(out)])
    assert quickstart.main(args) == 0
    assert len(json.loads((out / "bench.json").read_text())["requests"]) == 2
    png = out / "bench_cdf.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
