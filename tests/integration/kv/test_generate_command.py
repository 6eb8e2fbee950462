"""`pdserve generate`: two local processes, tokens checked against single-process generation."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from orchestrator.cli import build_parser

pytestmark = pytest.mark.slow


def test_generate_over_shm_prints_match(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(
        ["generate", "--transport", "shm", "--max-tokens", "5", "--model-dir", str(tiny_model_dir),
         "--prompt", "Hello there!", "--prompt", "The key-value cache is stored in fixed-size blocks. " * 12]
    )
    assert isinstance(args, argparse.Namespace)
    assert args._module.main(args) == 0
    out = capsys.readouterr().out
    assert out.count("  match") == 2 and "MISMATCH" not in out
    assert "GB/s" in out and "transport shm" in out


def test_generate_rejects_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["generate", "--max-tokens", "0"])
    assert args._module.main(args) == 2
    assert "--max-tokens must be >= 1" in capsys.readouterr().out
    args = build_parser().parse_args(["generate", "--model-dir", str(tmp_path)])
    assert args._module.main(args) == 2
    assert "not a model directory" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--transport", "pigeon"])


def test_ctrl_c_stops_generate_without_a_traceback_from_its_processes(tiny_model_dir: Path) -> None:
    # Ctrl-C reaches the whole foreground process group: the two child processes leave it to the parent
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

    pdserve = shutil.which("pdserve", path=os.path.dirname(sys.executable)) or "pdserve"
    proc = subprocess.Popen(
        [pdserve, "generate", "--max-tokens", "2000", "--model-dir", str(tiny_model_dir), "--no-check"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        assert "prompt(s)" in proc.stdout.readline()  # the children start right after this line
        time.sleep(4.0)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130 and "interrupted" in err
    assert "Traceback" not in err, err[-3000:]
