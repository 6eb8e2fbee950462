"""huge_page_buffer: the memory nixl registers (and the benchmark's raw NIXL ceiling uses)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from workers.kv.hugepages import huge_page_buffer


def _thp_mode() -> str | None:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    found = re.search(r"\[(\w+)\]", text)
    return found.group(1) if found else None


def _anon_huge_kb(address: int) -> int:
    """AnonHugePages of the mapping of this process that holds ``address``."""
    current = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if head:
            current = int(head.group(1), 16) <= address < int(head.group(2), 16)
        elif current and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


def test_huge_page_buffer_is_aligned_zeroed_and_on_huge_pages_where_the_host_allows() -> None:
    nbytes = (6 << 20) + 123
    buffer = huge_page_buffer(nbytes)
    assert buffer.dtype == torch.uint8 and buffer.numel() == nbytes
    assert buffer.data_ptr() % (2 << 20) == 0
    assert int(buffer.count_nonzero()) == 0
    buffer[-1] = 7  # writable to its last byte
    assert int(buffer[-1]) == 7
    if _thp_mode() in ("madvise", "always"):
        assert _anon_huge_kb(buffer.data_ptr()) >= 4 << 10  # at least two of its three full huge pages
