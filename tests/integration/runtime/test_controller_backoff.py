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

    pattern = re.compile(r"starting worker (\S+) failed \(next try in ([\d.]+) s\)")

    def tries() -> list[tuple[str, float, float]]:
        """(instance id, wait announced, when logged) of each failed start so far."""
        found = [(pattern.search(r.getMessage()), r.created) for r in caplog.records]
        return [(m.group(1), float(m.group(2)), at) for m, at in found if m]

    async def supervise_until_three_tries(limit_s: float) -> None:
        end = time.monotonic() + limit_s
        while len(tries()) < 3 and time.monotonic() < end:
            await controller.supervise_once()
            await asyncio.sleep(config.health_interval_s)
        await controller.shutdown()

    with caplog.at_level(logging.WARNING, logger="orchestrator.runtime.controller"):
        asyncio.run(supervise_until_three_tries(60.0))
    seen = tries()
    assert len(seen) == 3, [r.getMessage() for r in caplog.records]
    # every try a new generation, each failure announcing twice the wait of the one before, and the next
    # try coming no sooner than that (rounds run every 0.25 s: without the backoff a try followed each)
    assert [name for name, _, _ in seen] == ["decode-0-g0", "decode-0-g1", "decode-0-g2"]
    assert [wait for _, wait, _ in seen] == [1.0, 2.0, 4.0]
    for (_, wait, at), (_, _, next_at) in zip(seen, seen[1:], strict=False):
        assert next_at - at >= wait
