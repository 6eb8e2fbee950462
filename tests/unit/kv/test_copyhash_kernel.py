"""The fused copy+checksum kernel: xxh3-64 exactly as the xxhash package computes it, and an exact copy."""

from __future__ import annotations

import mmap
import platform
import shutil
import warnings

import numpy as np
import pytest
import xxhash

from workers import native_build
from workers.kv import checksum, native

if checksum.KERNEL is None and shutil.which("cc") is None and shutil.which("gcc") is None:
    pytest.skip("no C compiler here: the KV checksum kernel cannot be built", allow_module_level=True)


ISAS = ["scalar", "sse2", "avx2", "avx512"] if platform.machine() in ("x86_64", "AMD64") else ["scalar"]


@pytest.fixture(scope="module", params=ISAS)
def kernel(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """The built kernel, once per stripe loop; the set-up command builds it wherever a compiler exists."""
    assert checksum.KERNEL is not None, f"KV checksum kernel not loaded: {checksum.KERNEL_STATE}"
    with native_build.isa_forced(checksum.KERNEL, request.param) as available:
        if not available:
            pytest.skip(f"this CPU has no {request.param}")
        yield checksum.KERNEL


LENGTHS = [241, 242, 255, 256, 257, 1023, 1024, 1025, 1087, 1088, 1089, 4096, 65_537, 512 << 10, (512 << 10) + 13]


@pytest.mark.parametrize("nbytes", LENGTHS)
def test_digest_and_copy_match_xxhash(kernel, nbytes: int) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(nbytes)
    src = rng.integers(0, 256, nbytes, dtype=np.uint8)
    for seed in (0, int(rng.integers(1, 2**63)), 2**64 - 1):
        want = xxhash.xxh3_64_intdigest(src, seed)
        assert kernel.xxh3_64(src, seed) == want
        for nontemporal in (False, True):
            for offset in (0, 8):  # a page-aligned target streams; an unaligned one falls back to plain stores
                region = np.frombuffer(mmap.mmap(-1, nbytes + 64), dtype=np.uint8)
                dst = region[offset : offset + nbytes]
                assert kernel.copy_xxh3_64(dst, src, seed, nontemporal) == want
                assert np.array_equal(dst, src)
                assert not region[offset + nbytes :].any()  # nothing written past the end


def test_every_length_of_the_tail_paths(kernel) -> None:  # type: ignore[no-untyped-def]
    src = np.random.default_rng(7).integers(0, 256, 3000, dtype=np.uint8)
    for nbytes in range(241, 3000, 7):
        dst = np.zeros(nbytes, dtype=np.uint8)
        assert kernel.copy_xxh3_64(dst, src[:nbytes], nbytes) == xxhash.xxh3_64_intdigest(src[:nbytes], nbytes)
        assert np.array_equal(dst, src[:nbytes])


# where a block's pieces end: on the stripe grid, off it, inside the last stripe, empty pieces
CUTS = [(), (64,), (100,), (1024, 1024), (63, 64, 65), (0, 300), (700,), (1000, 1030), (1050,)]


@pytest.mark.parametrize("cuts", CUTS)
@pytest.mark.parametrize("nbytes", [241, 1089, 65_537, (512 << 10) + 13])
def test_pieces_hash_and_copy_as_their_concatenation(kernel, nbytes: int, cuts: tuple[int, ...]) -> None:  # type: ignore[no-untyped-def]
    src = np.random.default_rng(nbytes + len(cuts)).integers(0, 256, nbytes, dtype=np.uint8)
    bounds = [0, *sorted(min(cut, nbytes) for cut in cuts), nbytes]
    if cuts and cuts[0] == 1050:  # measured from the end: the last stripe straddles two pieces
        bounds = [0, nbytes - 30, nbytes]
    pieces = [memoryview(src[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    for seed in (0, 2**64 - 1):
        want = xxhash.xxh3_64_intdigest(src, seed)
        assert kernel.xxh3_64(tuple(pieces), seed) == want
        assert kernel.xxh3_64(pieces, seed) == want  # a list as well
        region = np.frombuffer(mmap.mmap(-1, nbytes + 64), dtype=np.uint8)
        assert kernel.copy_xxh3_64(region[:nbytes], tuple(pieces), seed, True) == want
        assert np.array_equal(region[:nbytes], src)
        assert not region[nbytes:].any()


@pytest.mark.parametrize("cuts", [(64,), (700,), (1000, 1030)])
def test_pieces_named_by_address_hash_and_copy_as_their_bytes(kernel, cuts: tuple[int, ...]) -> None:  # type: ignore[no-untyped-def]
    """An (address, nbytes) piece reads the memory it names, beside buffer pieces in one source."""
    nbytes = (512 << 10) + 13
    src = np.random.default_rng(len(cuts)).integers(0, 256, nbytes, dtype=np.uint8)
    bounds = [0, *cuts, nbytes]
    pieces: list[object] = [memoryview(src[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    address = src.ctypes.data
    for i in range(0, len(pieces), 2):  # every other piece by address
        pieces[i] = (address + bounds[i], bounds[i + 1] - bounds[i])
    want = xxhash.xxh3_64_intdigest(src, 3)
    assert kernel.xxh3_64(tuple(pieces), 3) == want
    dst = np.zeros(nbytes, dtype=np.uint8)
    assert kernel.copy_xxh3_64(dst, pieces, 3, True) == want
    assert np.array_equal(dst, src)
    src[0] ^= 1  # the digest follows the memory, not a copy taken earlier
    assert kernel.xxh3_64(tuple(pieces), 3) == xxhash.xxh3_64_intdigest(src, 3)


def test_bad_memory_pieces_raise(kernel) -> None:  # type: ignore[no-untyped-def]
    src = np.zeros(500, dtype=np.uint8)
    with pytest.raises(ValueError, match="non-null address"):
        kernel.xxh3_64(((0, 500),))
    with pytest.raises(ValueError, match="non-null address"):
        kernel.xxh3_64(((src.ctypes.data, -1), bytes(500)))
    for bad in ((src.ctypes.data,), (src.ctypes.data, 500, 0), (str(src.ctypes.data), 500), (src.ctypes.data, 500.0)):
        with pytest.raises(TypeError, match="address, nbytes"):
            kernel.xxh3_64((bad,))
    with pytest.raises(TypeError):
        kernel.xxh3_64((src.ctypes.data, 500))  # a bare pair is two pieces, and an int is no buffer


def test_bad_arguments_raise(kernel) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="240"):
        kernel.xxh3_64(bytes(240))
    with pytest.raises(ValueError, match="equal lengths"):
        kernel.copy_xxh3_64(bytearray(500), bytes(501))
    with pytest.raises(TypeError):
        kernel.copy_xxh3_64(bytes(500), bytes(500))  # a read-only target
    with pytest.raises(ValueError, match="equal lengths"):
        kernel.copy_xxh3_64(bytearray(500), (bytes(200), bytes(200)))
    with pytest.raises(TypeError):
        kernel.xxh3_64((bytes(300), 5))  # not a buffer


@pytest.mark.parametrize("nbytes", [4096, 3 * checksum.BLOCK_NBYTES + 777])
def test_layer_checksums_equal_with_and_without_the_kernel(
    kernel, monkeypatch: pytest.MonkeyPatch, nbytes: int  # type: ignore[no-untyped-def]
) -> None:
    data = np.random.default_rng(1).integers(0, 256, nbytes, dtype=np.uint8)
    view = memoryview(data)
    cut = nbytes // 3  # a K|V boundary off the block grid
    with_kernel = checksum.copy_and_checksum(np.zeros(nbytes, np.uint8), (view[:cut], view[cut:]))
    assert checksum.checksum_buffer(view) == with_kernel
    monkeypatch.setattr(checksum, "KERNEL", None)
    target = np.zeros(nbytes, np.uint8)
    assert checksum.copy_and_checksum(target, (view[:cut], view[cut:])) == with_kernel
    assert checksum.checksum_buffer(view) == with_kernel
    assert np.array_equal(target, data)


def test_a_block_straddling_k_and_v_takes_the_kernel(kernel, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """A 512 KiB layer is one block split over K and V: it must not fall back to xxhash's streaming state."""
    data = np.random.default_rng(3).integers(0, 256, checksum.BLOCK_NBYTES, dtype=np.uint8)
    view = memoryview(data)
    want = xxhash.xxh3_64_intdigest(data)
    half = len(view) // 2

    class NoPythonHash:
        def __getattr__(self, name: str) -> None:
            raise AssertionError(f"xxhash.{name} used for a block the kernel can take")

    monkeypatch.setattr(checksum, "xxhash", NoPythonHash())
    target = np.zeros_like(data)
    assert checksum.copy_and_checksum(target, (view[:half], view[half:])) == want
    assert checksum.checksum_parts((view[:half], view[half:])) == want
    assert np.array_equal(target, data)


def test_a_build_of_another_source_is_not_loaded(kernel, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    assert native.load()[0] is kernel
    monkeypatch.setattr(native_build, "source_digest", lambda source: "0" * 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module, why = native.load()
    assert module is None and "stale" in why
    assert any("stale" in str(w.message) for w in caught)


def test_the_pure_switch_ignores_the_build(kernel, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv(native.PURE_ENV, "1")
    assert native.load() == (None, f"not used ({native.PURE_ENV} is set)")
    monkeypatch.setenv(native.PURE_ENV, "0")
    assert native.load()[0] is kernel


def test_an_unknown_instruction_set_is_refused(kernel) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="not available"):
        kernel.use_isa("avx9")


def test_a_build_without_its_source_is_not_loaded(kernel, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    # an install that shipped the build only: no source beside it
    monkeypatch.setattr(native.EXTENSION, "source", native.EXTENSION.source.with_name("_copyhash_not_shipped.c"))
    module, why = native.load()
    assert module is None and "missing" in why
