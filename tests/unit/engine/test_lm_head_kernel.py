"""The compiled CPU LM head: the logits of the plain projection, the same bits on every instruction set."""

from __future__ import annotations

import platform
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from workers import native_build
from workers.engine import lm_head, native
from workers.engine.config import EngineConfig
from workers.engine.engine import LLMEngine
from workers.engine.lm_head import KERNEL_ROWS, PackedLMHead, pack_lm_head

if lm_head.KERNEL is None and shutil.which("cc") is None and shutil.which("gcc") is None:
    pytest.skip("no C compiler here: the engine LM head kernel cannot be built", allow_module_level=True)

ISAS = ["scalar", "avx2", "avx512"] if platform.machine() in ("x86_64", "AMD64") else ["scalar"]


@pytest.fixture(scope="module", params=ISAS)
def kernel(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """The built kernel, once per instruction set; the set-up command builds it wherever a compiler exists."""
    assert lm_head.KERNEL is not None, f"engine LM head kernel not loaded: {lm_head.KERNEL_STATE}"
    with native_build.isa_forced(lm_head.KERNEL, request.param) as available:
        if not available:
            pytest.skip(f"this CPU has no {request.param}")
        yield lm_head.KERNEL


def _weight(vocab: int, hidden: int) -> torch.Tensor:
    return torch.randn(vocab, hidden, generator=torch.Generator().manual_seed(vocab * 7 + hidden)) * 0.05


# one panel; four-panel groups with leftover panels; a group whose last panel is partial; the tiny model's head
@pytest.mark.parametrize(("vocab", "hidden"), [(16, 8), (1000, 64), (60, 24), (3001, 100), (32000, 256)])
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 16, 17, 40])
def test_logits_are_the_projection_in_float64_to_rounding(kernel, vocab: int, hidden: int, rows: int) -> None:  # type: ignore[no-untyped-def]
    weight = _weight(vocab, hidden)
    head = PackedLMHead(weight, kernel)
    x = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(rows))
    got = head(x)
    exact = (x.double() @ weight.double().T).float()
    assert got.shape == (rows, vocab) and got.dtype == torch.float32
    torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(-1), F.linear(x, weight).argmax(-1))


def test_every_instruction_set_gives_the_same_bits() -> None:
    kernel = lm_head.KERNEL
    assert kernel is not None, lm_head.KERNEL_STATE
    weight = _weight(3001, 100)
    x = torch.randn(23, 100, generator=torch.Generator().manual_seed(3))
    head = PackedLMHead(weight, kernel)
    results = {}
    for isa in ISAS:
        with native_build.isa_forced(kernel, isa) as available:
            if available:
                results[isa] = head(x)
    assert "scalar" in results
    for isa, logits in results.items():
        assert torch.equal(logits, results["scalar"]), isa


@pytest.mark.parametrize("vocab", [35, 60])  # a partial last panel on its own (3 panels), and in a group of 4
def test_the_last_panel_writes_only_real_columns(kernel, vocab: int) -> None:  # type: ignore[no-untyped-def]
    weight = _weight(vocab, 32)
    head = PackedLMHead(weight, kernel)
    x = torch.randn(7, 32)
    out = np.full(7 * vocab + 5, 7.0, dtype=np.float32)  # a sentinel tail past rows * vocab
    kernel.logits(head._flat, x.numpy(), out, 7, 32, vocab)
    expected = (x.double() @ weight.double().T).numpy()
    np.testing.assert_allclose(out[: 7 * vocab].reshape(7, vocab), expected, rtol=1e-5, atol=1e-5)
    assert (out[7 * vocab :] == 7.0).all()


def test_bad_buffers_are_refused_not_read_past(kernel) -> None:  # type: ignore[no-untyped-def]
    head = PackedLMHead(_weight(40, 8), kernel)
    x = np.zeros((2, 8), dtype=np.float32)
    out = np.zeros((2, 40), dtype=np.float32)
    with pytest.raises(ValueError, match="hidden holds 8 float32 values, needs 16"):
        kernel.logits(head._flat, x[:1], out, 2, 8, 40)
    with pytest.raises(ValueError, match="out holds"):
        kernel.logits(head._flat, x, out[:1], 2, 8, 40)
    with pytest.raises(ValueError, match="panels holds"):
        kernel.logits(head._flat[:100], x, out, 2, 8, 40)
    with pytest.raises(ValueError, match="float32"):
        kernel.logits(head._flat, x.astype(np.float64), out, 2, 8, 40)
    with pytest.raises(ValueError, match="rows >= 0"):
        kernel.logits(head._flat, x, out, -1, 8, 40)
    with pytest.raises(ValueError, match="overflow a buffer size"):  # sizes that wrap around to small ones
        kernel.logits(head._flat, x, out, 1, 1 << 62, 1)
    with pytest.raises(BufferError):
        kernel.logits(head._flat, x, out.tobytes(), 2, 8, 40)  # read-only


def test_an_unknown_instruction_set_is_refused(kernel) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="not available"):
        kernel.use_isa("avx9")


def test_the_engine_takes_the_kernel_where_it_applies_and_torch_elsewhere(tiny_model_dir, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    engine = LLMEngine(tiny_model_dir, EngineConfig(kv_cache_bytes=8 << 20))
    model = engine.model
    assert model.packed_head is not None
    calls: list[int] = []
    real = PackedLMHead.__call__

    def counted(self: PackedLMHead, hidden: torch.Tensor) -> torch.Tensor:
        calls.append(hidden.shape[0])
        return real(self, hidden)

    monkeypatch.setattr(PackedLMHead, "__call__", counted)
    weight = model.lm_head.weight.detach()
    for rows in (1, 2, 16, 64, 65):
        x = torch.randn(rows, weight.shape[1])
        torch.testing.assert_close(model.logits(x), F.linear(x, weight), rtol=1e-5, atol=1e-5)
    assert calls == [r for r in (1, 2, 16, 64, 65) if r in KERNEL_ROWS] == [2, 16, 64]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the kernel is single-threaded: torch's parallel GEMM takes over
    try:
        model.logits(torch.randn(4, weight.shape[1]))
    finally:
        torch.set_num_threads(threads)
    assert calls == [2, 16, 64]
    unpacked = LLMEngine(tiny_model_dir, EngineConfig(kv_cache_bytes=8 << 20, packed_lm_head=False))
    assert unpacked.model.packed_head is None


def test_no_packed_copy_without_the_kernel_or_for_other_dtypes(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    assert pack_lm_head(_weight(64, 8).half()) is None
    monkeypatch.setattr(lm_head, "KERNEL", None)
    assert pack_lm_head(_weight(64, 8)) is None
    monkeypatch.setenv(native.PURE_ENV, "1")
    assert native.load() == (None, f"not used ({native.PURE_ENV} is set)")
