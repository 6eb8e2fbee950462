"""The Clock protocol: the only way time enters policy code.

The live runtime passes a wall clock (runtime adapter), the simulator a virtual
clock it advances itself. Core functions take ``now_s`` as a plain float.
"""

from __future__ import annotations

from typing import Protocol


class Clock(Protocol):
    """A source of the current time in seconds (monotonic within one run)."""

    def now_s(self) -> float:
        """Return the current time in seconds."""
        ...


class ManualClock:
    """A clock that moves only when told to; used by tests and the simulator."""

    def __init__(self, start_s: float = 0.0) -> None:
        self._now_s = start_s

    def now_s(self) -> float:
        """Return the current virtual time."""
        return self._now_s

    def advance_to(self, at_s: float) -> None:
        """Move time forward to ``at_s``; time never goes backwards."""
        if at_s < self._now_s:
            raise ValueError(f"time cannot go backwards: {at_s} < {self._now_s}")
        self._now_s = at_s
