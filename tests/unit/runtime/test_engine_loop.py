"""The engine loop's commands when the loop stops: each one runs or fails, none is left waiting (real engine)."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from workers.engine.config import EngineConfig
from workers.engine.engine import LLMEngine
from workers.service.engine_loop import EngineLoop


class _SlowPut(queue.SimpleQueue):  # type: ignore[type-arg]
    """A command queue whose put waits first: it widens the moment between submit's check and its put."""

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if item is not None:
            time.sleep(0.3)
        super().put(item, block, timeout)


def test_a_command_submitted_as_the_loop_stops_runs_or_fails(tiny_model_dir: Path) -> None:
    loop = EngineLoop(LLMEngine(tiny_model_dir, EngineConfig(num_blocks=16)), idle_wait_s=0.01)
    loop._commands = _SlowPut()
    submitted: list[Any] = []
    submitter = threading.Thread(target=lambda: submitted.append(loop.submit(lambda e: "ran")))
    submitter.start()
    time.sleep(0.05)  # submit has seen the loop running and waits in put
    loop.stop(timeout_s=5.0)
    submitter.join(5.0)
    (future,) = submitted
    try:
        outcome = future.result(timeout=2.0)  # it ran before the loop stopped
    except RuntimeError as exc:
        outcome = str(exc)
    assert outcome == "ran" or "stopped" in outcome  # "is stopped" too, if the submitter came late
    with pytest.raises(RuntimeError, match="stopped"):
        loop.submit(lambda e: "late").result(timeout=1.0)
