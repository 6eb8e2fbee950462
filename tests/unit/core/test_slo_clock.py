"""SLO arithmetic (DistServe definitions) and the manual clock."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.core.clock import ManualClock
from orchestrator.core.slo import RequestLatency, SLOTarget, attainment, meets, percentile, tpot_s


def test_tpot_excludes_first_token() -> None:
    assert tpot_s(ttft_s=0.5, e2e_s=2.5, output_tokens=5) == pytest.approx(0.5)
    assert tpot_s(ttft_s=0.5, e2e_s=0.5, output_tokens=1) == 0.0


def test_attainment_requires_both_targets() -> None:
    target = SLOTarget(ttft_s=0.25, tpot_s=0.1)
    lats = [
        RequestLatency(0.2, 1.1, 11),  # tpot 0.09: good
        RequestLatency(0.3, 1.2, 11),  # ttft too slow
        RequestLatency(0.2, 2.2, 11),  # tpot 0.2 too slow
        RequestLatency(0.25, 0.25, 1),  # boundary ttft, single token: good
    ]
    assert [meets(lat, target) for lat in lats] == [True, False, False, True]
    assert attainment(lats, target) == 0.5
    assert attainment([], target) == 0.0


def test_invalid_targets_are_rejected() -> None:
    with pytest.raises(ValueError, match="positive"):
        SLOTarget(ttft_s=0.0, tpot_s=0.1)
    with pytest.raises(ValueError, match="attainment"):
        SLOTarget(ttft_s=1.0, tpot_s=0.1, attainment=1.5)


def test_percentile_matches_numpy() -> None:
    rng = np.random.default_rng(7)
    values = list(rng.exponential(size=101))
    for q in (0, 10, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    with pytest.raises(ValueError):
        percentile([], 50)


def test_manual_clock_only_moves_forward() -> None:
    clock = ManualClock(1.0)
    clock.advance_to(2.5)
    assert clock.now_s() == 2.5
    with pytest.raises(ValueError):
        clock.advance_to(2.0)
