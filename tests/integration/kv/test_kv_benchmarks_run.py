"""The KV benchmarks run end to end on tiny sizes and print their ratios (so they cannot rot unnoticed)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def _ratios(text: str, pattern: str) -> list[float]:
    return [float(x) for x in re.findall(pattern, text)]


@pytest.mark.slow
def test_kv_transfer_bandwidth_prints_each_transport_against_its_ceilings() -> None:
    out = _run("kv_transfer.py", "--skip-ttft", "--kinds", "tcp,shm,torch_dist", "--sizes-mb", "1", "--reps", "1",
               "--raw-poll")
    assert "TCP congestion control of raw TCP and tcp alike" in out and "raw TCP's receiver polls" in out
    for kind in ("tcp", "shm", "torch_dist"):
        ratios = _ratios(out, rf"1 MB +{kind}: ([0-9.]+)x")
        assert len(ratios) == 1 and ratios[0] > 0, out


@pytest.mark.slow
def test_tcp_checksum_cost_prints_both_ratios() -> None:
    out = _run("tcp_checksum_cost.py", "--sizes-mb", "1", "--reps", "2")
    assert len(_ratios(out, r"raw\+hash/raw ([0-9.]+)x")) == 1 and len(_ratios(out, r"tcp/raw ([0-9.]+)x")) == 1, out


@pytest.mark.slow
def test_shm_poll_prints_the_sleeping_to_polling_ratio() -> None:
    out = _run("shm_poll.py", "--sizes-mb", "1", "--reps", "2")
    assert len(_ratios(out, r"sleeping/polling time per round ([0-9.]+)")) == 1, out
