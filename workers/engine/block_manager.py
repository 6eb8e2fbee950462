"""Paged KV bookkeeping in pure Python: a free list of fixed-size blocks and per-request block tables.

A request's table grows as its context grows (``ensure_capacity``) and is returned
whole to the free list when the request finishes, is aborted or is preempted
(``free``). Block numbers index the engine's KV storage; this module never touches it.
"""

from __future__ import annotations

from collections import deque


class OutOfKVBlocks(RuntimeError):
    """Not enough free KV blocks for the request; the message says how many were needed and free."""


class BlockManager:
    """Allocates blocks from a free list into per-request block tables."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks on the free list."""
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def table(self, request_id: str) -> list[int]:
        """The request's block table (empty if it holds none)."""
        return self._tables.get(request_id, [])

    def has(self, request_id: str) -> bool:
        """Whether the request holds a block table."""
        return request_id in self._tables

    def extra_blocks_needed(self, request_id: str, num_tokens: int) -> int:
        """Blocks to add so the request can hold ``num_tokens`` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(self.table(request_id)))

    def can_hold(self, request_id: str, num_tokens: int) -> bool:
        """Whether free blocks suffice to grow the request to ``num_tokens`` tokens."""
        return self.extra_blocks_needed(request_id, num_tokens) <= len(self._free)

    def ensure_capacity(self, request_id: str, num_tokens: int) -> list[int]:
        """Grow the request's table to hold ``num_tokens`` tokens; raises ``OutOfKVBlocks`` if it cannot."""
        need = self.extra_blocks_needed(request_id, num_tokens)
        if need > len(self._free):
            raise OutOfKVBlocks(
                f"request {request_id!r} needs {need} more KV blocks for {num_tokens} tokens, "
                f"{len(self._free)} of {self.num_blocks} free"
            )
        table = self._tables.setdefault(request_id, [])
        for _ in range(need):
            table.append(self._free.popleft())
        return table

    def free(self, request_id: str) -> int:
        """Return all of the request's blocks to the free list; returns how many."""
        table = self._tables.pop(request_id, [])
        self._free.extend(table)
        return len(table)
