"""Per-layer checksums: xxh3-64 chained over fixed 512 KiB blocks of the layer's bytes (K then V).

A layer's checksum is defined over the concatenation K||V cut into blocks
of ``BLOCK_NBYTES`` (the last one shorter): ``h = 0``, then for each block
``h = xxh3_64(block, seed=h)``. A flipped byte changes its block's digest
and so every seed after it, so a damaged byte anywhere in the layer is
caught; a layer no larger than one block has the plain xxh3-64 (seed 0).

Why blocks: the one-shot xxh3 call is ~20% faster than the streaming state
on this hardware (~33 GB/s on cache-hot data, ~9 GB/s from memory), and a
block can be hashed right beside its copy (a socket read, a shared-memory
slot) while it is still in L2, so the checksum adds one pass over cache,
not one over memory. Senders and receivers cut the same grid, whatever pieces they hold
(``block_groups``).

Where the optional C kernel is built (``workers.kv.native``), blocks take it
instead: the same xxh3-64 digests, taken straight from a block's pieces (a
block that straddles K and V needs no joining), and ``copy_and_checksum``
hashes each 64-byte stripe in registers as it copies it (with non-temporal
stores into aligned targets, as memcpy does for large copies) -- one pass
over memory at about memcpy's speed, where copy-then-hash ran at 0.5-0.75x
of it. Without the kernel a straddling block goes through xxhash's streaming
state, which gives the same digest as the one-shot call. A sender whose
bytes go through the kernel's socket code hashes each block right after its
send, while the block is still in cache (``hash_block``).

The NCCL path's bytes stay on the GPU, so both of its ends use another function,
``device_checksum``, computed on the device in bounded chunks (see the comment above it).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import xxhash

from workers.kv import native

if TYPE_CHECKING:
    import torch

BLOCK_NBYTES = 512 << 10  # a block and its copy fit in one core's 2 MiB L2 together

KERNEL, KERNEL_STATE = native.load()  # (None, why) without a current build: numpy + xxhash
# the senders' loops over queued layers in C, where the build has them (Linux): tcp's (a sendmsg, then a
# hash, per block) and shm's (each layer copied and hashed into its slot, then its frame sent)
SEND_KERNEL = getattr(KERNEL, "send_layers_xxh3_64", None)
COPY_KERNEL = getattr(KERNEL, "copy_layers_xxh3_64", None)


def kernel_hashes_every_block(nbytes: int) -> bool:
    """Whether each checksum block of ``nbytes`` is long enough for the kernel (more than 240 bytes)."""
    return KERNEL is not None and nbytes >= KERNEL.MIN_NBYTES and not 0 < nbytes % BLOCK_NBYTES < KERNEL.MIN_NBYTES


def _hash_one(piece: memoryview, seed: int) -> int:
    """xxh3-64 (seeded) of one contiguous piece."""
    if KERNEL is not None and len(piece) >= KERNEL.MIN_NBYTES:
        return int(KERNEL.xxh3_64(piece, seed))
    return xxhash.xxh3_64_intdigest(piece, seed)


class ChunkedChecksum:
    """Running layer checksum, fed the layer's bytes in order, in pieces of any size."""

    __slots__ = ("_value", "_state", "_filled")

    def __init__(self) -> None:
        self._value = 0
        self._state: xxhash.xxh3_64 | None = None  # a block begun but not completed
        self._filled = 0  # bytes of the current block seen so far

    def update(self, data: memoryview) -> None:
        """Add the next bytes of the layer."""
        if self._filled == 0 and len(data) == BLOCK_NBYTES:  # the common case: exactly one aligned block
            self._value = _hash_one(data, self._value)
            return
        while len(data):
            take = min(BLOCK_NBYTES - self._filled, len(data))
            if self._state is None:
                self._state = xxhash.xxh3_64(seed=self._value)
            self._state.update(data[:take])
            self._filled += take
            data = data[take:]
            if self._filled == BLOCK_NBYTES:
                self._value, self._state, self._filled = self._state.intdigest(), None, 0

    def digest(self) -> int:
        """The checksum of everything fed so far."""
        return int(self._state.intdigest() if self._state is not None else self._value)


def block_views(parts: Iterable[memoryview]) -> Iterator[memoryview]:
    """``parts`` cut at the block grid of their concatenation (a straddling block yields two pieces)."""
    offset = 0  # position in the concatenation
    for part in parts:
        start = 0
        while start < len(part):
            end = min(len(part), start + BLOCK_NBYTES - offset % BLOCK_NBYTES)
            yield part[start:end]
            offset += end - start
            start = end


def block_groups(parts: Iterable[memoryview]) -> Iterator[tuple[memoryview, ...]]:
    """The pieces of each block of the concatenation of ``parts``, block by block."""
    group: list[memoryview] = []
    filled = 0
    for piece in block_views(parts):
        group.append(piece)
        filled += len(piece)
        if filled == BLOCK_NBYTES:
            yield tuple(group)
            group, filled = [], 0
    if group:
        yield tuple(group)


def hash_block(pieces: tuple[memoryview, ...], seed: int) -> int:
    """The chained checksum after one more block (its pieces, from ``block_groups``), from ``seed`` before it."""
    if len(pieces) == 1:
        return _hash_one(pieces[0], seed)
    if KERNEL is not None and sum(len(piece) for piece in pieces) >= KERNEL.MIN_NBYTES:
        return int(KERNEL.xxh3_64(pieces, seed))
    state = xxhash.xxh3_64(seed=seed)
    for piece in pieces:
        state.update(piece)
    return int(state.intdigest())


def checksum_parts(parts: Iterable[memoryview]) -> int:
    """Checksum of the concatenation of ``parts`` (equal to hashing them as one buffer)."""
    value = 0
    if isinstance(parts, tuple) and len(parts) == 1:  # one buffer (every receiver): its blocks are plain slices
        view = parts[0]
        for start in range(0, len(view), BLOCK_NBYTES):
            value = _hash_one(view[start : start + BLOCK_NBYTES], value)
        return value
    for pieces in block_groups(parts):
        value = hash_block(pieces, value)
    return value


def checksum_buffer(buffer: memoryview) -> int:
    """Checksum of one contiguous buffer."""
    return checksum_parts((buffer,))


def copy_and_checksum(
    target: np.ndarray, parts: Iterable[memoryview], corrupt: bool = False, nontemporal: bool = True
) -> int:
    """Copy ``parts`` one after another into the uint8 array ``target``; checksum of what was copied.

    Each block goes through the kernel when it is built (hashed as it is copied, from its
    pieces); otherwise it is hashed right after its copy, from the target, while it is in cache.
    ``corrupt`` flips a byte after hashing (fault-injection tests). ``nontemporal``: the kernel
    writes around the caches (for a target another core reads next); False keeps a target that
    this thread reads back soon in cache. Callers that hand in a view
    of a shared mapping keep no reference to it past this call.
    """
    value = 0
    offset = 0
    for pieces in block_groups(parts):
        end = offset + sum(len(piece) for piece in pieces)
        if KERNEL is not None and end - offset >= KERNEL.MIN_NBYTES:
            source = pieces[0] if len(pieces) == 1 else pieces
            value = KERNEL.copy_xxh3_64(target[offset:end], source, value, nontemporal)
        else:
            start = offset
            for piece in pieces:
                np.copyto(target[start : start + len(piece)], np.frombuffer(piece, dtype=np.uint8))
                start += len(piece)
            value = xxhash.xxh3_64_intdigest(target.data[offset:end], value)  # the block is still in cache
        offset = end
    if corrupt:
        target[0] ^= 0xFF  # damaged after hashing: the receiver must catch it
    return int(value)


def request_tag(request_id: str) -> int:
    """A 64-bit tag of a request id, carried in every frame header."""
    return int(xxhash.xxh3_64_intdigest(request_id.encode()))  # tiny input: the one-shot call is fine


# The device checksum (NCCL path; both ends compute it with ``device_checksum``): the payload is read
# as little-endian 64-bit words w_i (the last one zero-padded), and
#     checksum = fmix64(sum_i fmix64(w_i + i * POSITION_STEP) mod 2**64  XOR  fmix64(nbytes))
# fmix64 (MurmurHash3's finalizer) is a bijection of 64-bit values, so for each position the term is a
# bijection of the word: a change to any one word always changes the sum. The terms of different
# positions are unrelated pseudo-random values, so a swap or any other edit of several words cancels
# out only by chance (~2**-64) -- unlike a position-weighted sum, whose weights repeat or share factors.
# The length breaks the tie between trailing zero bytes and padding. The sum is taken in fixed chunks
# of words so the temporaries stay two int64 buffers of a chunk each, whatever the layer's size;
# summation mod 2**64 is associative and commutative, so neither the chunking nor the order a device
# reduces in changes the value. Only int64 add, multiply, xor, bitwise and, and right shifts by a
# constant under 64 are used: torch wraps add and multiply mod 2**64 alike on every device (no floats,
# no device-dependent overflow), so CPU and CUDA agree bit for bit.
DEVICE_CHUNK_WORDS = 1 << 20  # 8 MiB of payload a step (a typical layer), in ~16 kernel launches; two 8 MiB int64 temporaries
POSITION_STEP = 0x9E3779B97F4A7C15  # odd (2**64 / golden ratio): i * step is a bijection of positions
_FMIX_MULTIPLIERS = (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53)
_FMIX_SHIFT = 33
_MASK64 = (1 << 64) - 1


def _as_int64(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits (torch's scalars are signed)."""
    return value - (1 << 64) if value >> 63 else value


def fmix64(value: int) -> int:
    """MurmurHash3's 64-bit finalizer of an unsigned 64-bit Python int."""
    for multiplier in _FMIX_MULTIPLIERS:
        value ^= value >> _FMIX_SHIFT
        value = value * multiplier & _MASK64
    return value ^ value >> _FMIX_SHIFT


def _fmix64_(x: torch.Tensor, scratch: torch.Tensor) -> None:
    """fmix64 of each int64 of ``x``, in place (``scratch``: a buffer of x's size)."""
    import torch

    low_bits = (1 << (64 - _FMIX_SHIFT)) - 1  # masks the sign bits an arithmetic shift brings in
    for multiplier in (*_FMIX_MULTIPLIERS, None):
        torch.bitwise_right_shift(x, _FMIX_SHIFT, out=scratch)
        x.bitwise_xor_(scratch.bitwise_and_(low_bits))  # x ^= x >>> 33 (a logical shift)
        if multiplier is not None:
            x.mul_(_as_int64(multiplier))


def _hashed_sum(words: torch.Tensor, first: int, x: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Sum mod 2**64 (a 0-d int64 tensor) of the terms of ``words``, the words at ``first`` on."""
    import torch

    torch.arange(first, first + words.numel(), out=x)
    x.mul_(_as_int64(POSITION_STEP)).add_(words)
    _fmix64_(x, scratch)
    return x.sum()


def device_checksum(*parts: torch.Tensor) -> int:
    """64-bit checksum of uint8 buffers laid end to end, computed where they lie (the NCCL path's CUDA staging).

    Deterministic and the same on every device for the same bytes (see the comment above), and the
    same for one buffer as for its bytes split into parts (K and V need not be joined first). Its
    temporaries are two int64 buffers of ``DEVICE_CHUNK_WORDS`` whatever the payload's size, and one
    more chunk's worth to copy each chunk into when a buffer is not 8-byte aligned (a slice) or not
    contiguous (a non-contiguous tensor of more than one dimension is copied whole by ``reshape``).
    """
    import torch

    if not parts:
        raise ValueError("device_checksum needs at least one buffer")
    for part in parts:
        if part.dtype != torch.uint8:
            raise ValueError(f"device_checksum takes uint8 buffers, not {part.dtype}")
    flats = [part.reshape(-1) for part in parts]
    if any(flat.numel() % 8 for flat in flats[:-1]):  # a part ending mid-word: its words span two parts
        flats = [torch.cat(flats)]
    device = flats[0].device
    nbytes = sum(flat.numel() for flat in flats)
    size = max(1, min(DEVICE_CHUNK_WORDS, -(-max(flat.numel() for flat in flats) // 8)))
    x = torch.empty(size, dtype=torch.int64, device=device)
    scratch = torch.empty_like(x)
    total = torch.zeros((), dtype=torch.int64, device=device)  # one host sync, at the end
    base = 0  # position of the part's first word in the whole
    for flat in flats:
        total += _part_sum(flat, base, x, scratch)
        base += flat.numel() // 8
    return fmix64((int(total.item()) & _MASK64) ^ fmix64(nbytes))


def _part_sum(flat: torch.Tensor, base: int, x: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """The sum of the terms of one flat uint8 buffer whose first word is word ``base`` of the whole."""
    import torch

    nbytes = flat.numel()
    num_whole = nbytes // 8  # words before the zero-padded tail, if any
    total = torch.zeros((), dtype=torch.int64, device=flat.device)
    aligned = flat.is_contiguous() and flat.storage_offset() % 8 == 0  # what view(int64) needs
    staging = None if aligned else torch.empty(x.numel() * 8, dtype=torch.uint8, device=flat.device)
    for first in range(0, num_whole, x.numel()):
        count = min(x.numel(), num_whole - first)
        chunk = flat[first * 8 : (first + count) * 8]
        if staging is not None:
            chunk = staging[: count * 8].copy_(chunk)
        total += _hashed_sum(chunk.view(torch.int64), base + first, x[:count], scratch[:count])
    if num_whole * 8 < nbytes:
        tail = torch.zeros(8, dtype=torch.uint8, device=flat.device)
        tail[: nbytes - num_whole * 8] = flat[num_whole * 8 :]
        total += _hashed_sum(tail.view(torch.int64), base + num_whole, x[:1], scratch[:1])
    return total
