"""Worker starts in the controller: backoff after failed starts, generations that only increase (no Ray).

The plain ``Controller`` runs its real supervision rounds; only the Ray boundary (creating and killing
actors, placement groups) is scripted, and time is a fake clock.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import pytest

from orchestrator.core.types import Role
from orchestrator.runtime import builder
from orchestrator.runtime.controller import ClusterConfig, Controller, SlotStarts, start_backoff_s
from orchestrator.runtime.placement import BundleShape, Slot
from workers.service.host import WorkerSpec
from workers.service.types import WorkerEndpoint

DECODE_0 = Slot(Role.DECODE, 0)


def test_the_backoff_doubles_from_one_second_up_to_thirty() -> None:
    assert [start_backoff_s(n) for n in range(8)] == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert start_backoff_s(10_000) == 30.0  # no overflow after a long outage
    assert start_backoff_s(3, base_s=0.5, cap_s=1.5) == 1.5


def test_slot_starts_back_off_per_slot_and_reset_after_a_success() -> None:
    starts = SlotStarts()
    other = Slot(Role.PREFILL, 0)
    assert starts.ready(DECODE_0, 0.0)
    assert starts.failed(DECODE_0, 10.0) == 1.0
    assert not starts.ready(DECODE_0, 10.5) and starts.ready(DECODE_0, 11.0)
    assert starts.ready(other, 10.5)  # backoffs are per slot
    assert starts.failed(DECODE_0, 11.0) == 2.0
    assert not starts.ready(DECODE_0, 12.9) and starts.ready(DECODE_0, 13.0)
    starts.succeeded(DECODE_0)
    assert starts.ready(DECODE_0, 13.0)
    assert starts.failed(DECODE_0, 20.0) == 1.0  # a success resets the schedule


def test_generations_only_increase_per_slot_and_skip_adopted_ones() -> None:
    starts = SlotStarts()
    assert [starts.claim(DECODE_0) for _ in range(3)] == [0, 1, 2]
    assert starts.claim(Slot(Role.DECODE, 1)) == 0  # per slot
    starts.seen(Slot(Role.PREFILL, 0), 7)  # adopted after a controller restart
    assert starts.claim(Slot(Role.PREFILL, 0)) == 8
    starts.seen(DECODE_0, 0)  # an older worker does not lower the counter
    assert starts.claim(DECODE_0) == 3


class _Remote:
    def __init__(self, result: Any = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error

    async def remote(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.result


class _Handle:
    """A worker actor handle: answers ``endpoint``; ``ping`` fails once the worker died."""

    def __init__(self, endpoint: WorkerEndpoint) -> None:
        self.endpoint = _Remote(endpoint)
        self.ping = _Remote(True)


@dataclass
class _Ray:
    """The Ray boundary: ``start_worker`` fails while ``failing`` is set; records ids and kills."""

    failing: bool = True
    started: list[tuple[float, str]] = field(default_factory=list)
    handles: dict[str, _Handle] = field(default_factory=dict)
    killed: list[Any] = field(default_factory=list)
    now_s: float = 0.0

    def start_worker(self, cluster: str, namespace: str, spec: WorkerSpec, shape: BundleShape, group: Any,
                     bundle_index: int) -> _Handle:
        self.started.append((self.now_s, spec.instance_id))
        if self.failing:
            raise RuntimeError("no node has the decode_pool resource")
        handle = _Handle(WorkerEndpoint(spec.instance_id, spec.role, "node-0", "127.0.0.1:1"))
        self.handles[spec.instance_id] = handle
        return handle

    def kill(self, handle: Any, no_restart: bool = True) -> None:
        self.killed.append(handle)


def test_failed_starts_back_off_and_never_reuse_an_instance_id(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import ray

    fake = _Ray()
    monkeypatch.setattr(builder, "start_worker", fake.start_worker)
    monkeypatch.setattr(ray, "kill", fake.kill)
    config = ClusterConfig(model_dir="unused", num_prefill=0, num_decode=1, probe_timeout_s=0.2)
    controller = Controller(config, "test", clock=lambda: fake.now_s)
    controller._groups[DECODE_0] = (None, 0)  # its placement group exists

    async def rounds_until(end_s: float) -> None:
        while fake.now_s <= end_s:
            await controller.supervise_once()
            for _ in range(5):  # let the start tasks the round spawned run
                await asyncio.sleep(0)
            fake.now_s += 0.5

    async def scenario() -> None:
        await rounds_until(14.5)  # every start fails
        fake.failing = False
        await rounds_until(15.0)
        assert [w.endpoint.instance_id for w in controller._workers.values()] == ["decode-0-g4"]
        fake.handles["decode-0-g4"].ping = _Remote(error=RuntimeError("actor died"))
        await rounds_until(15.5)  # probed dead: replaced at once (the success reset the backoff)
        for worker in controller._workers.values():
            await worker.client.close()

    with caplog.at_level(logging.WARNING, logger="orchestrator.runtime.controller"):
        asyncio.run(scenario())
    # Tries at 0, 1, 3, 7 and 15 s (backoff 1, 2, 4, 8 s), not every round, each under a new id.
    assert fake.started == [(0.0, "decode-0-g0"), (1.0, "decode-0-g1"), (3.0, "decode-0-g2"),
                            (7.0, "decode-0-g3"), (15.0, "decode-0-g4"), (15.5, "decode-0-g5")]
    assert [w.endpoint.instance_id for w in controller._workers.values()] == ["decode-0-g5"]
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and r.getMessage().startswith("starting worker")]
    assert len(warnings) == 4
    assert "decode-0-g0" in warnings[0] and "no node has the decode_pool resource" in warnings[0]
