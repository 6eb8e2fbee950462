"""Planning benchmark requests from trace columns."""

from __future__ import annotations

import pytest

from orchestrator.runtime.bench.workload import WorkloadOptions, plan_requests, prompt_ids

ARRIVALS = [10.0, 10.5, 12.0, 13.0, 20.0]
PROMPTS = [100, 2000, 50, 10, 3000]
OUTPUTS = [20, 300, 1, 0, 40]


def test_arrivals_shift_scale_start_and_limit() -> None:
    plan = plan_requests(ARRIVALS, PROMPTS, OUTPUTS, WorkloadOptions(rate_scale=2.0, start_s=0.5, limit=3))
    assert [r.send_at_s for r in plan] == [0.0, 0.75, 1.25]
    assert [r.trace_prompt_tokens for r in plan] == [2000, 50, 10]
    assert [r.index for r in plan] == [0, 1, 2]


def test_lengths_are_clipped_to_limits_and_context() -> None:
    plan = plan_requests(ARRIVALS, PROMPTS, OUTPUTS,
                         WorkloadOptions(max_prompt_tokens=1000, max_output_tokens=64, context_tokens=1024))
    assert [r.max_tokens for r in plan] == [20, 64, 1, 1, 40]  # zero-length outputs still ask for one token
    assert [r.prompt_tokens for r in plan] == [100, 960, 50, 10, 984]
    assert all(r.prompt_tokens + r.max_tokens <= 1024 for r in plan)


def test_prompts_are_deterministic_and_in_range() -> None:
    options = WorkloadOptions(seed=3, id_low=5, id_high=9)
    [first, second] = plan_requests([0.0, 1.0], [7, 7], [1, 1], options)
    ids = prompt_ids(first, options)
    assert len(ids) == 7 and all(5 <= t < 9 for t in ids)
    assert prompt_ids(first, options) == ids
    assert prompt_ids(second, options) != ids


@pytest.mark.parametrize(
    "kwargs", [{"rate_scale": 0}, {"start_s": -1}, {"limit": 0}, {"max_output_tokens": 0}, {"id_low": 9, "id_high": 9}]
)
def test_bad_options(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        WorkloadOptions(**kwargs)


def test_empty_and_mismatched_columns() -> None:
    assert plan_requests([], [], [], WorkloadOptions()) == []
    with pytest.raises(ValueError):
        plan_requests([1.0], [1, 2], [1], WorkloadOptions())
