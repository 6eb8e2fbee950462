"""The CPU LM head through the compiled panel kernel (``workers.engine.native``), where it applies.

A decode step on CPU reads the whole LM head weight (vocab x hidden, fp32) for a handful of rows.
MKL's GEMM over the unpacked weight streamed it at ~6 GB/s cold on the development host (5-6 ms
of a ~12 ms decode step for the tiny model's 32k x 256 head at 16 rows); packed into contiguous
panels of 16 vocabulary rows, the kernel reads it front to back at about memory speed.

The packed copy costs vocab x hidden x 4 bytes beside the model's own weight, which the other
paths keep using (``EngineConfig.packed_lm_head`` turns it off). The kernel is single-threaded:
it is used only while torch runs one intra-op thread (the engine's CPU default), for fp32
hidden states on CPU, at the row counts where it measured faster (``KERNEL_ROWS``: a decode step
of 2-64 sequences). Its logits are each one chain of fused multiply-adds over the hidden dimension
in order; MKL's GEMM over the column-major head gave the same bits at those row counts on the
development host, and greedy parity with transformers holds through the kernel
(tests/integration/engine/test_engine_hf_parity.py).
"""

from __future__ import annotations

from types import ModuleType

import torch

from workers.engine import native

KERNEL, KERNEL_STATE = native.load()  # (None, why) without a current build

# Row counts the kernel takes. Tiny model's 32k x 256 head, one thread, caches swept before each call:
# 2-32 rows 1.1-1.4x MKL's speed (16 rows 2.2 against 3.2 ms), 64 rows 7.2 against 6.6 ms (both near
# the core's multiply-add peak there), 1 row the same (MKL's GEMV). Inside decode steps, where the
# rest of the step has pushed the head out of cache: 16 rows 2.6-3.4 against 4.2-4.7 ms, 32 rows
# 5.0 against 7.5 ms, 64 rows 8.7 against 8.8-9.5 ms.
KERNEL_ROWS = range(2, 65)


class PackedLMHead:
    """An LM head weight packed as ``[ceil(vocab / 16), hidden, 16]`` panels, and the kernel that reads them."""

    def __init__(self, weight: torch.Tensor, kernel: ModuleType) -> None:
        vocab, hidden = weight.shape
        panel = int(kernel.PANEL)
        padded = -(-vocab // panel) * panel
        rows = weight.detach().to(device="cpu", dtype=torch.float32)
        if padded != vocab:  # zero rows fill the last panel; their logits are never stored
            rows = torch.cat([rows, rows.new_zeros(padded - vocab, hidden)])
        # panel p, column k holds weight[16p : 16p + 16, k]: a panel is read front to back once per call
        self._panels = rows.reshape(padded // panel, panel, hidden).transpose(1, 2).contiguous()
        self._flat = self._panels.view(-1).numpy()
        self._kernel = kernel
        self.vocab = vocab
        self.hidden = hidden

    @property
    def nbytes(self) -> int:
        """Memory the packed copy holds."""
        return self._panels.numel() * self._panels.element_size()

    def applies(self, hidden: torch.Tensor) -> bool:
        """Whether the kernel computes these logits: fp32 CPU rows (``KERNEL_ROWS`` of them), one torch thread."""
        return (
            hidden.device.type == "cpu" and hidden.dtype == torch.float32 and hidden.dim() == 2
            and hidden.shape[0] in KERNEL_ROWS and hidden.shape[1] == self.hidden and torch.get_num_threads() == 1
        )

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden @ weight.T`` as fp32 ``[rows, vocab]`` logits (``hidden``: fp32 CPU rows, see ``applies``)."""
        rows = hidden.contiguous()
        out = torch.empty(rows.shape[0], self.vocab, dtype=torch.float32)
        self._kernel.logits(self._flat, rows.numpy(), out.numpy(), rows.shape[0], self.hidden, self.vocab)
        return out


def pack_lm_head(weight: torch.Tensor) -> PackedLMHead | None:
    """The packed head for ``weight`` where the kernel is built and the weight is fp32 on CPU, else None."""
    if KERNEL is None or weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.dim() != 2:
        return None
    return PackedLMHead(weight, KERNEL)
