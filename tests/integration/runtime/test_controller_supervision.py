"""The controller on a real local Ray: a worker whose engine stopped is replaced at once, not after six probes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from orchestrator.runtime.controller import ClusterConfig, Controller

pytestmark = pytest.mark.slow


def test_a_worker_whose_engine_stopped_is_replaced_in_the_next_round(ray_session: None, tiny_model_dir: Path) -> None:
    import ray

    namespace = ray.get_runtime_context().namespace
    config = ClusterConfig(model_dir=str(tiny_model_dir), cluster="t-engine-stop", num_prefill=0, num_decode=1,
                           num_kv_blocks=64, health_interval_s=1.0)
    controller = Controller(config, namespace)

    async def ids() -> set[str]:
        view = await controller.get_view()
        assert view is not None
        return {inst.instance_id for inst in view.snapshot.instances}

    async def scenario() -> float:
        try:
            (first,) = await ids()
            # the worker's process stays up; its server and engine loop stop (as when the loop crashed)
            await ray.get_actor(f"{config.cluster}/worker/{first}", namespace=namespace).stop.remote()
            t0 = time.monotonic()
            while first in await ids():
                assert time.monotonic() - t0 < 30.0
                await asyncio.sleep(0.1)
            return time.monotonic() - t0
        finally:
            await controller.shutdown()

    # a probe round every second: at once is within a round or two, where six failed probes took 6 s and more
    replaced_after_s = asyncio.run(scenario())
    assert replaced_after_s < 3.5, replaced_after_s
