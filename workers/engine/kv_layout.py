"""The shape of an engine's KV cache, shared with KV transports and disaggregated workers."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class KVLayout:
    """Per-layer K/V tensors are ``[num_tokens, num_kv_heads, head_dim]`` of ``dtype``, stored in blocks."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_token_per_layer(self) -> int:
        """Bytes of K plus V for one token in one layer."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_kv_heads * self.head_dim * itemsize

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block across all layers (K and V)."""
        return self.block_size * self.num_layers * self.bytes_per_token_per_layer
