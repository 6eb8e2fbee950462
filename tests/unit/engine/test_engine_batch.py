"""Batch building: flat order, slots from block tables, decode groups, in-place reads and sampled rows."""

from __future__ import annotations

import torch

from workers.engine.batch import VIEW_MIN_TOKENS, _length_groups, build_batch, run_start_slot
from workers.engine.sampling_params import SamplingParams
from workers.engine.scheduler import ScheduledChunk, Sequence


def _seq(rid: str, n: int, computed: int) -> Sequence:
    seq = Sequence(rid, n, list(range(100, 100 + n)), SamplingParams(), 0)
    seq.num_computed_tokens = computed
    return seq


def test_length_groups_split_only_dissimilar_lengths() -> None:
    assert _length_groups([]) == []
    assert _length_groups([1, 5, 100, 128]) == [(0, 4)]  # short contexts stay together
    assert _length_groups([100, 140, 200, 290, 301]) == [(0, 2), (2, 4), (4, 5)]


def test_decodes_first_sorted_then_chunks_with_slots_and_sample_rows() -> None:
    long_decode = _seq("long", 400, 399)
    short_decode = _seq("short", 10, 9)
    chunk = _seq("chunk", 20, 4)  # tokens 4..11 this step, not finished: no sample
    tables = {"long": list(range(100, 125)), "short": [7], "chunk": [3, 9]}
    chunks = [ScheduledChunk(long_decode, 1), ScheduledChunk(chunk, 8), ScheduledChunk(short_decode, 1)]
    batch = build_batch(chunks, [tables[c.seq.request_id] for c in chunks], 16, torch.device("cpu"))

    assert [c.seq.request_id for c in batch.chunks] == ["short", "long", "chunk"]
    assert batch.positions.tolist() == [9, 399] + list(range(4, 12))
    assert batch.input_ids.tolist()[:2] == [109, 499]
    # short: block 7 offset 9; long: position 399 -> table[24] = 124, offset 15; chunk: block 3 offsets 4..11
    assert batch.meta.slot_mapping.tolist() == [7 * 16 + 9, 124 * 16 + 15] + [
        3 * 16 + o for o in range(4, 12)
    ]
    assert batch.sample_rows == [0, 1]
    assert [c.seq.request_id for c in batch.sample_chunks] == ["short", "long"]

    short_group, long_group = batch.meta.decodes  # 10 and 400 tokens of context: two groups
    assert (short_group.row_start, short_group.num_seqs, short_group.max_context) == (0, 1, 10)
    assert (long_group.row_start, long_group.max_context) == (1, 400)
    assert long_group.block_ids.tolist() == list(range(100, 125))
    (prefill,) = batch.meta.prefills
    assert (prefill.q_start, prefill.q_len, prefill.context_len) == (2, 8, 12)
    assert prefill.context_blocks is not None and prefill.context_blocks.tolist() == [3]
    assert prefill.mask is not None and prefill.mask.shape == (8, 12)
    assert prefill.mask[0].tolist() == [0.0] * 5 + [float("-inf")] * 7  # position 4 sees 0..4
    assert prefill.context_slot is None  # without kv_views the context is gathered


def test_padded_decode_group_masks_padding() -> None:
    a, b = _seq("a", 20, 19), _seq("b", 30, 29)
    batch = build_batch(
        [ScheduledChunk(a, 1), ScheduledChunk(b, 1)], [[1, 2], [3, 4]], 16, torch.device("cpu")
    )
    (group,) = batch.meta.decodes
    assert group.block_ids.tolist() == [1, 2, 3, 4]
    assert group.mask.shape == (2, 1, 1, 30)
    assert torch.isinf(group.mask[0, 0, 0, 20:]).all() and (group.mask[0, 0, 0, :20] == 0).all()
    assert (group.mask[1] == 0).all()


def test_run_start_slot_needs_the_used_blocks_in_order() -> None:
    assert run_start_slot([5, 6, 7], 40, 16) == 80
    assert run_start_slot([5, 6, 9], 32, 16) == 80  # only the blocks holding the 32 tokens count
    assert run_start_slot([5, 6, 9], 33, 16) is None
    assert run_start_slot([3, 5, 4, 6], 64, 16) is None  # consecutive blocks, wrong order
    assert run_start_slot([7], 1, 16) == 112


def test_kv_views_read_runs_in_place_and_gather_the_rest() -> None:
    long_run = _seq("run", 200, 199)  # blocks 20..32: one run
    long_split = _seq("split", 150, 149)  # blocks out of order: gathered
    short = _seq("short", 10, 9)  # one block, but too short to be worth its own call
    chunk = _seq("chunk", 100, 40)  # prompt tokens 40..99 after 40 cached ones, blocks 50..56
    tables = {
        "run": list(range(20, 33)),
        "split": [60, 61, 62, 63, 64, 65, 66, 67, 99, 69],
        "short": [7],
        "chunk": list(range(50, 57)),
    }
    chunks = [
        ScheduledChunk(short, 1),
        ScheduledChunk(long_split, 1),
        ScheduledChunk(chunk, 60),
        ScheduledChunk(long_run, 1),
    ]
    batch = build_batch(
        chunks, [tables[c.seq.request_id] for c in chunks], 16, torch.device("cpu"), kv_views=True
    )
    assert [c.seq.request_id for c in batch.chunks] == ["run", "short", "split", "chunk"]
    assert batch.meta.view_decodes == [(20 * 16, 200)]
    assert batch.meta.slot_mapping.tolist()[0] == 20 * 16 + 199
    short_group, split_group = batch.meta.decodes
    assert (short_group.row_start, short_group.num_seqs, short_group.max_context) == (1, 1, 10)
    assert (split_group.row_start, split_group.max_context) == (2, 150)
    (prefill,) = batch.meta.prefills
    assert prefill.context_slot == 50 * 16 and prefill.context_blocks is None
    assert (prefill.q_start, prefill.q_len, prefill.context_len) == (3, 60, 100)
    assert batch.sample_rows == [0, 1, 2, 62]  # the chunk ends its prompt: its last row samples too
    assert batch.positions.tolist() == [199, 9, 149, *range(40, 100)]
    assert VIEW_MIN_TOKENS > 10


def test_single_token_prompt_chunk_does_not_sample() -> None:
    prompt = _seq("p", 30, 20)  # one more prompt token of 30: attention like a decode, no sample
    decode = _seq("d", 8, 7)
    batch = build_batch(
        [ScheduledChunk(prompt, 1), ScheduledChunk(decode, 1)], [[0, 1], [2]], 16, torch.device("cpu")
    )
    assert [c.seq.request_id for c in batch.chunks] == ["d", "p"]
    assert batch.sample_rows == [0]
    assert [c.seq.request_id for c in batch.sample_chunks] == ["d"]
