"""Block allocator: free list, per-request tables, growth, reuse and exhaustion."""

from __future__ import annotations

import pytest

from workers.engine.block_manager import BlockManager, OutOfKVBlocks


def test_tables_grow_by_whole_blocks_and_free_returns_them() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.ensure_capacity("a", 5) == [0, 1]
    assert bm.ensure_capacity("a", 8) == [0, 1]  # still fits in two blocks
    assert bm.ensure_capacity("a", 9) == [0, 1, 2]
    assert bm.num_free_blocks == 5
    assert bm.free("a") == 3
    assert bm.num_free_blocks == 8
    assert not bm.has("a")


def test_freed_blocks_are_reused() -> None:
    bm = BlockManager(num_blocks=3, block_size=2)
    a = bm.ensure_capacity("a", 6)
    bm.free("a")
    b = bm.ensure_capacity("b", 6)
    assert sorted(a) == sorted(b) == [0, 1, 2]


def test_exhaustion_raises_without_partial_allocation() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.ensure_capacity("a", 12)
    with pytest.raises(OutOfKVBlocks, match="needs 2 more KV blocks.*1 of 4 free"):
        bm.ensure_capacity("b", 8)
    assert bm.num_free_blocks == 1
    assert not bm.has("b")
    assert bm.can_hold("b", 4) and not bm.can_hold("b", 5)


def test_invalid_sizes_rejected() -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(num_blocks=0, block_size=4)


def test_new_tables_keep_room_for_expected_growth_and_grow_in_one_run() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    assert bm.ensure_capacity("a", 8, expected_tokens=20) == [0, 1]  # blocks 2..4 kept open for "a"
    assert bm.ensure_capacity("b", 4, expected_tokens=8) == [5]
    assert bm.ensure_capacity("a", 20) == [0, 1, 2, 3, 4]
    assert bm.ensure_capacity("b", 8) == [5, 6]
    assert bm.num_free_blocks == 16 - 7


def test_growth_past_a_taken_block_falls_back_to_any_free_block() -> None:
    bm = BlockManager(num_blocks=6, block_size=2)
    assert bm.ensure_capacity("a", 2) == [0]
    assert bm.ensure_capacity("b", 2) == [1]
    assert bm.ensure_capacity("a", 4) == [0, 2]  # block 1 belongs to "b"
    bm.free("b")
    assert bm.ensure_capacity("c", 4) == [3, 4]  # first run of two free blocks
    assert bm.ensure_capacity("a", 6) == [0, 2, 1]  # block 3 is taken: lowest free block


def test_kept_room_is_handed_out_when_nothing_else_is_free() -> None:
    bm = BlockManager(num_blocks=6, block_size=2)
    bm.ensure_capacity("a", 2, expected_tokens=12)  # block 0 plus room 1..5
    assert bm.num_free_blocks == 5 and bm.can_hold("b", 10)
    assert bm.ensure_capacity("b", 4) == [1, 2]  # no open run left: the kept room is used
    assert bm.ensure_capacity("c", 6) == [3, 4, 5]
    assert bm.num_free_blocks == 0
    with pytest.raises(OutOfKVBlocks):
        bm.ensure_capacity("a", 4)


def test_freeing_a_table_reopens_its_kept_room() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    bm.ensure_capacity("a", 2, expected_tokens=8)  # block 0, room 1..3
    assert bm.ensure_capacity("b", 4) == [4, 5]
    assert bm.free("a") == 1
    assert bm.ensure_capacity("c", 8) == [0, 1, 2, 3]  # the whole former room is open again
    assert bm.num_free_blocks == 2
