"""`pdserve up` on its own local Ray stops promptly when its whole process group gets SIGTERM.

That is what a service manager (systemd's default) or ``timeout`` sends: Ray's own processes die with
the group, and the driver then waited Ray's default 60 s for the lost GCS before it could exit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.runtime.embedded import LOCAL_GCS_RECONNECT_S

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]


def test_sigterm_to_the_process_group_stops_up_within_the_gcs_reconnect_bound(tiny_model_dir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "up", "--model", str(tiny_model_dir), "--port", "0",
         "--prefill", "1", "--decode", "1"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        lines = []
        while not any("is serving" in line for line in lines[-1:]):
            line = proc.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.communicate(timeout=120)
        assert time.monotonic() - t0 < LOCAL_GCS_RECONNECT_S + 15
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is left
        except ProcessLookupError:
            pass
