"""The controller on a real local Ray: health before the first probe, starts racing a round, and shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from runtime_helpers import wait_for

from orchestrator.core.types import InstanceHealth
from orchestrator.runtime import builder
from orchestrator.runtime.controller import ClusterConfig, Controller
from orchestrator.runtime.placement import instance_id_of, parse_instance_id

pytestmark = pytest.mark.slow


def _namespace() -> str:
    import ray

    return str(ray.get_runtime_context().namespace)


def _groups(cluster: str) -> list[tuple[str, str]]:
    """(name, state) of the placement groups of ``cluster`` not removed."""
    import ray

    table = ray.util.placement_group_table().values()
    return sorted((e["name"], e["state"]) for e in table if e["state"] != "REMOVED" and e["name"].startswith(cluster + "/"))


async def _supervise_until(controller: Controller, done: Callable[[], bool], limit_s: float) -> None:
    """Run supervision rounds until ``done`` (without ``start``, so no background rounds interfere)."""
    end = time.monotonic() + limit_s
    while not done():
        assert time.monotonic() < end, "supervision did not get there in time"
        await controller.supervise_once()
        await asyncio.sleep(0.2)


@contextmanager
def _paused(pid: int) -> Iterator[None]:
    """The process ``pid`` hangs (SIGSTOP) inside the block."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def test_a_worker_hung_before_its_first_probe_leaves_routing(ray_session: None, tiny_model_dir: Path) -> None:
    config = ClusterConfig(model_dir=str(tiny_model_dir), cluster="t-hung-fresh", num_prefill=0, num_decode=1,
                           num_kv_blocks=64, probe_timeout_s=0.5)
    controller = Controller(config, _namespace())

    async def scenario() -> InstanceHealth:
        try:
            await _supervise_until(controller, lambda: len(controller._workers) == 1, 120.0)
            (worker,) = controller._workers.values()
            assert worker.load is None  # registered, never probed
            pid = await worker.handle.__ray_call__.remote(lambda _: os.getpid())
            with _paused(pid):
                for _ in range(config.supervision.unhealthy_after_failures):
                    await controller.supervise_once()
                (published,) = controller._view.snapshot.instances
            return published.health
        finally:
            await controller.shutdown()

    assert asyncio.run(scenario()) is InstanceHealth.UNHEALTHY


def test_a_start_that_finishes_during_the_probes_is_not_started_again(ray_session: None, tiny_model_dir: Path) -> None:
    import ray

    config = ClusterConfig(model_dir=str(tiny_model_dir), cluster="t-start-race", num_prefill=0, num_decode=2,
                           num_kv_blocks=64)
    controller = Controller(config, _namespace())
    probe = controller._probe

    async def slow_probe(worker: Any) -> None:
        # a round whose probes last until the replacement of decode-0 has registered
        await probe(worker)
        while not any(w.slot.index == 0 for w in controller._workers.values()):
            await asyncio.sleep(0.05)

    async def scenario() -> tuple[list[str], int]:
        try:
            await _supervise_until(controller, lambda: len(controller._workers) == 2, 120.0)
            ray.kill(controller._workers["decode-0-g0"].handle, no_restart=True)
            await _supervise_until(controller, lambda: controller.replacements == 1, 30.0)
            controller._probe = slow_probe  # type: ignore[method-assign]
            await asyncio.wait_for(controller.supervise_once(), 120.0)
            return sorted(controller._workers), len(controller._starting)
        finally:
            await controller.shutdown()

    workers, starting = asyncio.run(scenario())
    assert (workers, starting) == (["decode-0-g1", "decode-1-g0"], 0)


def _controller_actor(config: ClusterConfig) -> Any:
    return builder.start_controller(config, _namespace(), detached=False)


def _shut_down(actor: Any) -> None:
    import ray

    ray.get(actor.shutdown.remote(), timeout=60)
    ray.kill(actor, no_restart=True)


def test_a_restarted_controller_removes_the_groups_of_its_earlier_incarnation(
    ray_session: None, tiny_model_dir: Path
) -> None:
    import ray

    config = ClusterConfig(model_dir=str(tiny_model_dir), cluster="t-shutdown-restarted", num_prefill=0,
                           num_decode=1, num_kv_blocks=64)
    actor = _controller_actor(config)
    ray.get(actor.start.remote(), timeout=120)
    pid = ray.get(actor.__ray_call__.remote(lambda _: os.getpid()), timeout=30)
    ray.kill(actor, no_restart=False)
    wait_for(lambda: ray.get(actor.__ray_call__.remote(lambda _: os.getpid()), timeout=30) != pid, 60, "a restart")
    assert _groups(config.cluster)
    _shut_down(actor)  # its first call: nothing adopted yet
    assert _groups(config.cluster) == []
    assert builder.list_workers(config.cluster, _namespace()) == []


def test_shutdown_while_start_waits_for_a_group_removes_it(ray_session: None, tiny_model_dir: Path) -> None:
    import ray

    # no node has that many CPUs: the group stays pending and start() waits for it
    config = ClusterConfig(model_dir=str(tiny_model_dir), cluster="t-shutdown-pending", num_prefill=0,
                           num_decode=1, num_cpus_per_worker=1000.0, num_kv_blocks=64)
    actor = _controller_actor(config)
    started = actor.start.remote()
    wait_for(lambda: bool(_groups(config.cluster)), 30, "a pending group")
    _shut_down(actor)
    assert _groups(config.cluster) == []
    with pytest.raises(ray.exceptions.RayError):
        ray.get(started, timeout=30)



def test_a_restarted_controller_does_not_reuse_the_id_of_a_stalled_worker(
    ray_session: None, tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = ClusterConfig(model_dir=str(tiny_model_dir), cluster="t-stalled-id", num_prefill=0, num_decode=1,
                           num_kv_blocks=64, probe_timeout_s=1.0, worker_start_timeout_s=3.0)
    first = Controller(config, _namespace())
    restarted = Controller(config, _namespace())  # a new incarnation: it has seen no generation yet

    stalled: list[str] = []

    async def scenario() -> None:
        try:
            await _supervise_until(first, lambda: len(first._workers) == 1, 120.0)
            (worker,) = first._workers.values()
            stalled.append(worker.endpoint.instance_id)  # not always g0: a start may time out on a loaded machine
            pid = await worker.handle.__ray_call__.remote(lambda _: os.getpid())
            caplog.clear()  # only the restarted controller's starts from here
            with _paused(pid), pytest.raises(TimeoutError):  # the stalled worker holds the bundle its successor needs
                await restarted.start()
        finally:
            await restarted.shutdown()

    with caplog.at_level(logging.WARNING, logger="orchestrator.runtime.controller"):
        asyncio.run(scenario())
    tried = [m.group(1) for r in caplog.records if (m := re.search(r"starting worker (\S+) failed", r.getMessage()))]
    slot, generation = parse_instance_id(stalled[0])
    assert tried == [instance_id_of(slot, generation + 1)], [r.getMessage() for r in caplog.records]
