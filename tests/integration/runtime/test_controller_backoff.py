"""The controller on a real local Ray, with a worker that cannot start: it backs off and never reuses an id."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from pathlib import Path

import pytest

from orchestrator.runtime.controller import ClusterConfig, Controller

pytestmark = pytest.mark.slow


def test_a_worker_that_cannot_start_is_retried_with_backoff_under_new_ids(
    ray_session: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import ray

    # no config.json there: each worker actor fails while it loads the model
    config = ClusterConfig(model_dir=str(tmp_path / "no-model"), cluster="t-backoff", num_prefill=0, num_decode=1,
                           health_interval_s=0.25, start_backoff_s=1.0)
    controller = Controller(config, ray.get_runtime_context().namespace)

    async def supervise_for(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            await controller.supervise_once()
            await asyncio.sleep(config.health_interval_s)
        await controller.shutdown()

    with caplog.at_level(logging.WARNING, logger="orchestrator.runtime.controller"):
        asyncio.run(supervise_for(10.0))
    failures = [re.search(r"starting worker (\S+) failed \(next try in ([\d.]+) s\)", r.getMessage())
                for r in caplog.records]
    tries = [(m.group(1), float(m.group(2))) for m in failures if m]
    assert len(tries) >= 2, [r.getMessage() for r in caplog.records]
    # every try a new generation, each failure waiting twice the one before (1, 2, 4 ... s): a start that
    # failed in every 0.25 s round would have made far more tries in 10 s
    assert [name for name, _ in tries] == [f"decode-0-g{i}" for i in range(len(tries))]
    assert [delay for _, delay in tries] == [min(30.0, 2.0**i) for i in range(len(tries))]
    assert len(tries) <= 4
