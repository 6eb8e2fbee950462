"""The discrete-event loop: one heap, one total order, one virtual clock.

Every event is ``(at_s, priority, seq, handler, payload)``. ``seq`` is a
counter assigned at scheduling time, so two events at the same instant with
the same priority run in the order they were scheduled: the run is a pure
function of its inputs (no dict/hash order, no wall time).

A handler is called as ``handler(now_s, payload)`` and returns the events it
wants scheduled next (an iterable of ``(at_s, priority, handler, payload)``)
or None; the loop, not the handler, puts them on the heap.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from enum import IntEnum
from typing import Any


class EventPriority(IntEnum):
    """Order of events that happen at the same instant (lower runs first)."""

    # Arrivals and KV deliveries first, so a step that ends at the same
    # instant already sees the newcomers when it forms the next batch.
    ARRIVAL = 0
    TRANSFER = 1
    STEP_END = 2
    CONTROL = 3


Handler = Callable[[float, Any], "Iterable[Scheduled] | None"]
# (at_s, priority, handler, payload): what handlers hand back to the loop.
Scheduled = tuple[float, int, Handler, Any]


class EventLoop:
    """A heap of events ordered by ``(at_s, priority, seq)``; also the run's Clock."""

    __slots__ = ("_heap", "_seq", "_now_s", "events_run")

    def __init__(self, start_s: float = 0.0) -> None:
        self._heap: list[tuple[float, int, int, Handler, Any]] = []
        self._seq = 0
        self._now_s = start_s
        self.events_run = 0

    def now_s(self) -> float:
        """Current virtual time (implements ``orchestrator.core.clock.Clock``)."""
        return self._now_s

    def schedule(self, at_s: float, priority: int, handler: Handler, payload: Any = None) -> None:
        """Put one event on the heap; events in the past are a bug and raise."""
        if at_s < self._now_s:
            raise ValueError(f"event scheduled in the past: {at_s} < now {self._now_s}")
        self._seq += 1
        heapq.heappush(self._heap, (at_s, priority, self._seq, handler, payload))

    def __len__(self) -> int:
        return len(self._heap)

    def run(self, until_s: float = float("inf")) -> None:
        """Run events in order until the heap is empty or the next one is after ``until_s``."""
        heap = self._heap
        pop = heapq.heappop
        push = heapq.heappush
        count = 0
        try:
            while heap:
                if heap[0][0] > until_s:
                    break
                at_s, _prio, _seq, handler, payload = pop(heap)
                self._now_s = at_s
                count += 1
                out = handler(at_s, payload)
                if out:
                    # Handlers may also have called schedule(); continue its numbering.
                    seq = self._seq
                    for ev_at_s, ev_prio, ev_handler, ev_payload in out:
                        if ev_at_s < at_s:
                            raise ValueError(f"event scheduled in the past: {ev_at_s} < now {at_s}")
                        seq += 1
                        push(heap, (ev_at_s, ev_prio, seq, ev_handler, ev_payload))
                    self._seq = seq
        finally:
            self.events_run += count
