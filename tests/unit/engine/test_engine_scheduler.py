"""Scheduler: token budget, decodes first, chunked prefill, admission limits and preemption."""

from __future__ import annotations

from workers.engine.block_manager import BlockManager
from workers.engine.config import EngineRole
from workers.engine.sampling_params import SamplingParams
from workers.engine.scheduler import Scheduler, SeqStatus, Sequence

_arrival = iter(range(10**6))


def _seq(rid: str, prompt_len: int) -> Sequence:
    return Sequence(rid, prompt_len, list(range(prompt_len)), SamplingParams(), next(_arrival))


def _advance(sched: Scheduler, sample_token: int = 7) -> list[tuple[str, int]]:
    """Run one schedule and apply it the way the engine does; returns (id, tokens) per chunk."""
    out = sched.schedule()
    for c in out.chunks:
        c.seq.num_computed_tokens += c.num_tokens
        if c.seq.num_computed_tokens == c.seq.num_tokens:
            c.seq.token_ids.append(sample_token)
    return [(c.seq.request_id, c.num_tokens) for c in out.chunks]


def test_long_prompt_is_chunked_by_the_budget() -> None:
    sched = Scheduler(BlockManager(100, 4), max_num_seqs=8, max_num_batched_tokens=10)
    sched.add(_seq("a", 25))
    assert _advance(sched) == [("a", 10)]
    assert _advance(sched) == [("a", 10)]
    assert _advance(sched) == [("a", 5)]
    assert _advance(sched) == [("a", 1)]  # now decoding


def test_decodes_go_first_and_prefill_fills_the_rest() -> None:
    sched = Scheduler(BlockManager(100, 4), max_num_seqs=8, max_num_batched_tokens=8)
    sched.add(_seq("a", 3))
    sched.add(_seq("b", 2))
    assert _advance(sched) == [("a", 3), ("b", 2)]
    sched.add(_seq("c", 20))
    assert _advance(sched) == [("a", 1), ("b", 1), ("c", 6)]
    assert sched.queued_prefill_tokens == 14  # decodes do not count


def test_max_num_seqs_limits_admission() -> None:
    sched = Scheduler(BlockManager(100, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for rid in "abc":
        sched.add(_seq(rid, 4))
    assert [r for r, _ in _advance(sched)] == ["a", "b"]
    assert [s.request_id for s in sched.waiting] == ["c"]


def test_admission_waits_for_blocks() -> None:
    bm = BlockManager(4, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    sched.add(_seq("a", 16))
    sched.add(_seq("b", 4))
    assert _advance(sched) == [("a", 16)]
    assert [s.request_id for s in sched.waiting] == ["b"]


def test_decode_without_blocks_preempts_the_latest_admitted() -> None:
    bm = BlockManager(3, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    a, b = _seq("a", 4), _seq("b", 4)
    sched.add(a)
    sched.add(b)
    _advance(sched)  # both prompts fill one block each; each sampled a token
    # a takes the last free block; b finds none, nobody later to evict, so b is preempted
    # and not re-admitted in the same step.
    assert _advance(sched) == [("a", 1)]
    assert b.status is SeqStatus.WAITING and b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert list(sched.waiting) == [b]
    assert bm.table("b") == []
    sched.remove(a)
    assert _advance(sched) == [("b", 5)]  # recomputes prompt plus its generated token
    assert bm.num_free_blocks == 1


def test_lone_sequence_preempts_itself_when_out_of_blocks() -> None:
    bm = BlockManager(2, 2)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    other = _seq("x", 2)
    bm.ensure_capacity("hold", 2)  # a reservation outside the scheduler owns one block
    sched.add(other)
    _advance(sched)
    out = sched.schedule()
    assert out.chunks == () and out.preempted == (other,)
    assert other.status is SeqStatus.WAITING


def test_prefill_only_role_runs_a_resumed_requests_last_token_as_a_chunk() -> None:
    sched = Scheduler(
        BlockManager(100, 4), max_num_seqs=8, max_num_batched_tokens=7, role=EngineRole.PREFILL_ONLY
    )
    resumed = Sequence("r", 5, list(range(8)), SamplingParams(), next(_arrival))  # 5 prompt + 3 output tokens
    sched.add(resumed)
    assert sched.queued_prefill_tokens == 8
    assert _advance(sched) == [("r", 7)]
    assert resumed.is_decoding  # only the last output token is left, as for a decode
    assert sched.queued_prefill_tokens == 1
    sched.add(_seq("b", 2))
    assert _advance(sched) == [("r", 1), ("b", 2)]
    assert resumed.num_computed_tokens == 8 and resumed.num_tokens == 9  # sampled: the engine ends it now


def test_remove_frees_blocks_from_any_queue() -> None:
    bm = BlockManager(10, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    a, b = _seq("a", 8), _seq("b", 8)
    sched.add(a)
    _advance(sched)
    sched.add(b)
    sched.remove(a)
    sched.remove(b)
    assert bm.num_free_blocks == 10 and not sched.running and not sched.waiting
