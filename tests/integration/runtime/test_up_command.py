"""`pdserve up` as a real subprocess joining the session's Ray: serves, then SIGTERM stops what it started."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from runtime_helpers import Reference, prompt_of

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]


def _worker_actors(cluster_prefix: str) -> list[str]:
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(cluster_prefix)]


def test_up_serves_the_openai_api_and_sigterm_stops_its_workers(
    ray_session: None, tiny_model_dir: Path, reference: Reference
) -> None:
    import ray

    address = ray.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled", "PDSERVE_API_KEY": "k3y"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "up", "--address", address, "--model", str(tiny_model_dir),
         "--port", "0", "--kv-blocks", "256", "--kv-poll-us", "50", "--kv-tcp-congestion", "system",
         "--slo-class", "interactive"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        url = None
        deadline = time.monotonic() + 150
        lines = []
        assert proc.stdout is not None
        hint = None
        while hint is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            match = re.search(r"at (http://\S+)/v1", line)
            if match:
                url = match.group(1)
            if line.startswith("  try: "):
                hint = line[len("  try: "):].strip()
        assert url is not None and hint is not None, "".join(lines)
        assert "k3y" not in hint  # the key is read from the environment, never printed
        hinted = subprocess.run(["bash", "-c", hint + " -sS"], env=env, capture_output=True, text=True, timeout=60)
        assert "choices" in hinted.stdout, hinted.stdout + hinted.stderr
        assert any(name.endswith("/controller") for name in _worker_actors("pdserve-"))
        prompt = prompt_of(42)
        body = {"model": tiny_model_dir.name, "prompt": prompt, "max_tokens": 10, "temperature": 0}
        auth = {"Authorization": "Bearer k3y"}
        resp = httpx.post(f"{url}/v1/completions", json=body, timeout=60,
                          headers={**auth, "x-pdserve-slo-class": "interactive"})
        assert resp.status_code == 200, resp.text
        unknown = httpx.post(f"{url}/v1/completions", json=body, timeout=60,
                             headers={**auth, "x-pdserve-slo-class": "not-configured"})
        assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "x-pdserve-slo-class"
        assert resp.json()["choices"][0]["text"] == reference.complete(prompt, 10)[1]
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=90)
    assert rc == 0
    # everything it started is gone; the Ray cluster it joined still runs
    assert ray.is_initialized() and ray.cluster_resources().get("decode_pool", 0) >= 1
    time.sleep(1.0)
    assert not [n for n in _worker_actors("pdserve-") if "/worker/" in n and not n.startswith(("t1p1d", "t2p2d"))]
