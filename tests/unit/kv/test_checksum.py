"""The layer checksum: one value whatever pieces carry the bytes, and any flipped byte changes it."""

from __future__ import annotations

import numpy as np
import pytest
import xxhash

from workers.kv.checksum import (
    BLOCK_NBYTES,
    ChunkedChecksum,
    block_views,
    checksum_buffer,
    checksum_parts,
    copy_and_checksum,
)

SIZES = [1, 100, BLOCK_NBYTES - 1, BLOCK_NBYTES, BLOCK_NBYTES + 1, 3 * BLOCK_NBYTES + 777]


def _payload(nbytes: int) -> np.ndarray:
    return np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)


@pytest.mark.parametrize("nbytes", SIZES)
def test_pieces_copies_and_streams_agree(nbytes: int) -> None:
    data = _payload(nbytes)
    view = memoryview(data)
    whole = checksum_buffer(view)
    for cut in {0, 1, nbytes // 3, nbytes // 2, min(nbytes, BLOCK_NBYTES + 5)}:  # K|V split anywhere
        assert checksum_parts((view[:cut], view[cut:])) == whole
        for nontemporal in (True, False):  # streaming stores, or cache-filling ones (nixl's staging)
            target = np.zeros(nbytes + 16, dtype=np.uint8)
            assert copy_and_checksum(target, (view[:cut], view[cut:]), nontemporal=nontemporal) == whole
            assert np.array_equal(target[:nbytes], data)
    running = ChunkedChecksum()
    for start in range(0, nbytes, 4099):  # pieces that ignore the block grid
        running.update(view[start : start + 4099])
    assert running.digest() == whole


def test_block_views_cut_at_the_grid_of_the_concatenation() -> None:
    k, v = memoryview(bytes(BLOCK_NBYTES + 10)), memoryview(bytes(BLOCK_NBYTES))
    lengths = [len(piece) for piece in block_views((k, v))]
    assert lengths == [BLOCK_NBYTES, 10, BLOCK_NBYTES - 10, 10]
    assert sum(lengths) == len(k) + len(v)


def test_a_single_block_is_plain_xxh3() -> None:
    data = memoryview(_payload(4096))
    assert checksum_buffer(data) == xxhash.xxh3_64_intdigest(data)


@pytest.mark.parametrize("position", [0, BLOCK_NBYTES - 1, BLOCK_NBYTES, 2 * BLOCK_NBYTES + 3, 3 * BLOCK_NBYTES + 776])
def test_one_flipped_byte_anywhere_changes_the_checksum(position: int) -> None:
    data = _payload(3 * BLOCK_NBYTES + 777)
    good = checksum_buffer(memoryview(data))
    data[position] ^= 0x01
    assert checksum_buffer(memoryview(data)) != good


def test_copy_with_fault_injection_damages_the_copy_not_the_checksum() -> None:
    data = _payload(BLOCK_NBYTES + 3)
    target = np.zeros_like(data)
    checksum = copy_and_checksum(target, (memoryview(data),), corrupt=True)
    assert checksum == checksum_buffer(memoryview(data))
    assert checksum_buffer(memoryview(target)) != checksum
