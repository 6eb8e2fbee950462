"""Worker starts in the controller: the backoff after failed starts and generations that only increase.

The pure bookkeeping, with time passed in; tests/integration/runtime/test_controller_backoff.py runs the
controller itself on a real local Ray.
"""

from __future__ import annotations

from orchestrator.core.types import Role
from orchestrator.runtime.controller import SlotStarts, start_backoff_s
from orchestrator.runtime.placement import Slot

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
