"""KV storage in torch: per layer one K and one V tensor of ``num_blocks * block_size`` token slots.

Each tensor is head-major, ``[num_kv_heads, num_slots, head_dim]``; slot
``block * block_size + offset`` holds one token (see ``model.Attention`` for why).
The block manager decides which blocks a request owns; this module turns block
tables into slot indices and moves whole layers in and out.
"""

from __future__ import annotations

import torch

from workers.engine.kv_layout import KVLayout


def num_blocks_for_budget(layout: KVLayout, budget_bytes: int) -> int:
    """How many blocks fit in ``budget_bytes`` (at least one)."""
    return max(1, budget_bytes // layout.bytes_per_block)


class KVCache:
    """Preallocated K/V slot tensors for every layer."""

    def __init__(self, layout: KVLayout, num_blocks: int, device: torch.device) -> None:
        self.layout = layout
        self.num_blocks = num_blocks
        num_slots = num_blocks * layout.block_size
        shape = (layout.num_kv_heads, num_slots, layout.head_dim)
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = [
            (
                torch.zeros(shape, dtype=layout.dtype, device=device),
                torch.zeros(shape, dtype=layout.dtype, device=device),
            )
            for _ in range(layout.num_layers)
        ]
        self.device = device

    def slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        """Slot indices of token positions ``[start, end)`` under ``block_table``."""
        bs = self.layout.block_size
        return [block_table[p // bs] * bs + p % bs for p in range(start, end)]

    def slot_tensor(self, block_table: list[int], num_tokens: int) -> torch.Tensor:
        """Slots of positions ``[0, num_tokens)`` as a tensor on the cache's device."""
        bs = self.layout.block_size
        blocks = torch.tensor(block_table[: -(-num_tokens // bs)], dtype=torch.long)
        slots = (blocks[:, None] * bs + torch.arange(bs)[None, :]).flatten()[:num_tokens]
        return slots.to(self.device)

    def write_layer(
        self, layer_idx: int, block_table: list[int], k: torch.Tensor, v: torch.Tensor, token_offset: int = 0
    ) -> None:
        """Scatter one layer's ``[num_tokens, kv_heads, head_dim]`` K/V into positions from ``token_offset``."""
        expected = (self.layout.num_kv_heads, self.layout.head_dim)
        if k.shape != v.shape or k.dim() != 3 or tuple(k.shape[1:]) != expected:
            raise ValueError(
                f"layer {layer_idx} K/V must both be [num_tokens, {expected[0]}, {expected[1]}], "
                f"got {tuple(k.shape)} and {tuple(v.shape)}"
            )
        if not 0 <= layer_idx < self.layout.num_layers:
            raise ValueError(f"layer_idx must be in [0, {self.layout.num_layers}), got {layer_idx}")
        slots = self.slot_tensor(block_table, token_offset + k.shape[0])[token_offset:]
        k_cache, v_cache = self.layers[layer_idx]
        if k.is_cuda:
            # K/V may come from another stream (a KV receiver's): without this, the allocator could hand
            # their memory to that stream's next layer while this stream's copy below still reads it
            stream = torch.cuda.current_stream(k.device)
            k.record_stream(stream)
            v.record_stream(stream)
        k_cache.index_copy_(1, slots, k.to(device=self.device, dtype=self.layout.dtype).transpose(0, 1))
        v_cache.index_copy_(1, slots, v.to(device=self.device, dtype=self.layout.dtype).transpose(0, 1))

    def read_layer(
        self, layer_idx: int, block_table: list[int], num_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather one layer's K/V of positions ``[0, num_tokens)`` (used by migration and tests)."""
        slots = self.slot_tensor(block_table, num_tokens)
        k_cache, v_cache = self.layers[layer_idx]
        return k_cache[:, slots].transpose(0, 1).contiguous(), v_cache[:, slots].transpose(0, 1).contiguous()
