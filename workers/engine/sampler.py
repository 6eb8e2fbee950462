"""Token selection: greedy, temperature, top-k and top-p, reproducible under a seed.

A seeded request draws each token from a generator seeded by ``(seed, output
position)``, so recomputing after a preemption or resuming on another worker
yields the same tokens. Unseeded requests share the engine's generator.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from workers.engine.sampling_params import SamplingParams


def position_seed(seed: int, output_position: int) -> int:
    """A 63-bit generator seed derived from a request seed and an output position."""
    digest = hashlib.blake2b(f"{seed}:{output_position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Softmax of temperature-scaled logits restricted to top-k and top-p."""
    scaled = logits / params.temperature
    if 0 < params.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the first always stays.
        drop = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        scaled = torch.empty_like(scaled).scatter_(0, order, sorted_logits)
    return torch.softmax(scaled, dim=-1)


def greedy_tokens(logits: torch.Tensor) -> list[int]:
    """The first maximum of every row of ``logits`` ``[num_rows, vocab]``."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.is_contiguous():
        # numpy's vectorised argmax scans a row ~10x faster than torch's max-with-index kernel on CPU
        # (16 x 32k logits: ~0.08 ms against ~1 ms) and also returns the first maximum.
        return [int(t) for t in np.argmax(logits.detach().numpy(), axis=1).tolist()]
    # max().indices picks the same token as argmax (first maximum) and runs ~2x faster than it.
    return [int(t) for t in logits.max(dim=-1).indices.tolist()]


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    output_positions: list[int],
    generator: torch.Generator,
) -> list[int]:
    """One token per row of ``logits`` ``[num_rows, vocab]``; ``output_positions`` index the new tokens."""
    tokens = greedy_tokens(logits)
    for row, p in enumerate(params):
        if p.greedy:
            continue
        probs = _filtered_probs(logits[row].float().cpu(), p)
        if not bool(torch.isfinite(probs).all()):
            continue  # logits that overflowed (inf/nan from the model) have no distribution: keep the argmax
        gen = generator
        if p.seed is not None:
            gen = torch.Generator().manual_seed(position_seed(p.seed, output_positions[row]))
        tokens[row] = int(torch.multinomial(probs, 1, generator=gen).item())
    return [int(t) for t in tokens]
