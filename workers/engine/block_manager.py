"""Paged KV bookkeeping in pure Python: fixed-size blocks and per-request block tables.

A request's table grows as its context grows (``ensure_capacity``) and is returned
whole to the free list when the request finishes, is aborted or is preempted
(``free``). Block numbers index the engine's KV storage; this module never touches it.

Placement prefers runs of consecutive blocks: a new table starts in a free run long
enough for the tokens the request expects to reach, the rest of that run is kept
open for its growth (other requests take it only when nothing else is free), and a
growing table takes the block right after its last one when that block is free. A
table that is one run lets attention read the request's KV as a view of the cache
instead of gathering it. Placement never changes how many blocks can be allocated:
any free block can still be taken, so fragmentation costs speed, never capacity.
"""

from __future__ import annotations


class OutOfKVBlocks(RuntimeError):
    """Not enough free KV blocks for the request; the message says how many were needed and free."""


class BlockManager:
    """Allocates blocks into per-request block tables, keeping each table one run where it can."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Byte maps searched with bytearray.find (C speed): 1 where the block is free, and 1 where it is
        # free and not kept open for another request's growth.
        self._free = bytearray(b"\x01") * num_blocks
        self._open = bytearray(b"\x01") * num_blocks
        self._num_free = num_blocks
        self._tables: dict[str, list[int]] = {}
        self._earmarks: dict[str, range] = {}  # blocks kept open for a request's expected growth

    @property
    def num_free_blocks(self) -> int:
        """Blocks on the free list."""
        return self._num_free

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
        return self.extra_blocks_needed(request_id, num_tokens) <= self._num_free

    def ensure_capacity(
        self, request_id: str, num_tokens: int, expected_tokens: int | None = None
    ) -> list[int]:
        """Grow the request's table to hold ``num_tokens`` tokens; raises ``OutOfKVBlocks`` if it cannot.

        ``expected_tokens`` (a placement hint, used when the table is created) is how long the
        request is expected to grow; room for it is kept open after the table when possible.
        """
        need = self.extra_blocks_needed(request_id, num_tokens)
        if need > self._num_free:
            raise OutOfKVBlocks(
                f"request {request_id!r} needs {need} more KV blocks for {num_tokens} tokens, "
                f"{self._num_free} of {self.num_blocks} free"
            )
        table = self._tables.setdefault(request_id, [])
        if need == 0:
            return table
        if not table:
            expected = min(max(need, self.blocks_for(expected_tokens or 0)), self.num_blocks)
            start = self._open.find(b"\x01" * expected)
            if start >= 0:
                self._take_run(table, start, need)
                if expected > need:
                    self._earmark(request_id, range(start + need, start + expected))
                return table
            run = self._find_run(need)
            if run is not None:
                self._take_run(table, run, need)
                return table
        for _ in range(need):
            after = table[-1] + 1 if table else self.num_blocks
            if after < self.num_blocks and self._free[after]:
                self._take(table, after)
            else:
                self._take(table, self._first_free())
        return table

    def free(self, request_id: str) -> int:
        """Return all of the request's blocks to the free list; returns how many."""
        table = self._tables.pop(request_id, [])
        for block in table:
            self._free[block] = 1
            self._open[block] = 1
        self._num_free += len(table)
        earmark = self._earmarks.pop(request_id, None)
        if earmark is not None:
            for block in earmark:
                if self._free[block]:
                    self._open[block] = 1
        return len(table)

    # ----- placement ----------------------------------------------------------------------------

    def _find_run(self, count: int) -> int | None:
        """Start of ``count`` free blocks in a row, preferring blocks no other request keeps open."""
        for flags in (self._open, self._free):
            start = flags.find(b"\x01" * count)
            if start >= 0:
                return start
        return None

    def _earmark(self, request_id: str, blocks: range) -> None:
        self._open[blocks.start : blocks.stop] = bytes(len(blocks))
        self._earmarks[request_id] = blocks

    def _first_free(self) -> int:
        block = self._open.find(1)
        return block if block >= 0 else self._free.find(1)

    def _take_run(self, table: list[int], start: int, count: int) -> None:
        self._free[start : start + count] = bytes(count)
        self._open[start : start + count] = bytes(count)
        self._num_free -= count
        table.extend(range(start, start + count))

    def _take(self, table: list[int], block: int) -> None:
        self._free[block] = 0
        self._open[block] = 0
        self._num_free -= 1
        table.append(block)
