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
