"""The event loop's total order (time, priority, seq), including ties."""

from __future__ import annotations

import pytest

from orchestrator.core.clock import Clock
from simulations.sim.events import EventLoop, EventPriority


def test_ties_run_by_priority_then_scheduling_order() -> None:
    loop = EventLoop()
    ran: list[str] = []

    def record(now_s: float, name: str) -> None:
        ran.append(f"{name}@{now_s:g}")

    loop.schedule(1.0, EventPriority.CONTROL, record, "control")
    loop.schedule(1.0, EventPriority.STEP_END, record, "step-a")
    loop.schedule(1.0, EventPriority.ARRIVAL, record, "arrival")
    loop.schedule(1.0, EventPriority.STEP_END, record, "step-b")
    loop.schedule(0.5, EventPriority.CONTROL, record, "early")
    loop.schedule(1.0, EventPriority.TRANSFER, record, "transfer")
    loop.run()
    assert ran == ["early@0.5", "arrival@1", "transfer@1", "step-a@1", "step-b@1", "control@1"]


def test_events_returned_by_handlers_join_the_same_order() -> None:
    loop = EventLoop()
    ran: list[str] = []

    def spawn(now_s: float, name: str):  # type: ignore[no-untyped-def]
        ran.append(name)
        if name == "first":
            # Same instant and priority as "second", scheduled later: runs after it.
            return [(now_s, EventPriority.STEP_END, spawn, "child"), (now_s, EventPriority.ARRIVAL, spawn, "urgent")]
        return None

    loop.schedule(2.0, EventPriority.STEP_END, spawn, "first")
    loop.schedule(2.0, EventPriority.STEP_END, spawn, "second")
    loop.run()
    assert ran == ["first", "urgent", "second", "child"]
    assert loop.events_run == 4
    assert loop.now_s() == 2.0


def test_loop_is_a_clock_and_time_never_goes_back() -> None:
    loop = EventLoop()
    clock: Clock = loop
    loop.schedule(3.0, EventPriority.ARRIVAL, lambda now_s, _: [(now_s - 1.0, 0, lambda *_: None, None)])
    with pytest.raises(ValueError, match="in the past"):
        loop.run()
    assert clock.now_s() == 3.0
    with pytest.raises(ValueError, match="in the past"):
        loop.schedule(1.0, EventPriority.ARRIVAL, lambda *_: None)


def test_run_until_stops_before_later_events() -> None:
    loop = EventLoop()
    ran: list[float] = []
    for t in (1.0, 2.0, 3.0):
        loop.schedule(t, EventPriority.ARRIVAL, lambda now_s, _: ran.append(now_s))
    loop.run(until_s=2.0)
    assert ran == [1.0, 2.0] and len(loop) == 1
    loop.run()
    assert ran == [1.0, 2.0, 3.0]
