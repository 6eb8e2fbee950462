"""A Llama-family decoder over a flat batch of tokens with a paged KV cache.

One forward runs every token scheduled in a step, flattened: decode tokens first
(one per sequence), then prefill chunks. Dense layers (projections, MLP, norms)
run once over all of them; attention runs per kind of work: one padded call per
group of decodes of similar context length, one call per prefill chunk. New K/V
are written into their cache slots before attention, so a chunk attends to
earlier chunks through the cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from workers.engine.config import ModelConfig, RopeScaling

# Called as on_layer_kv(layer_idx, k, v) with [num_tokens, num_kv_heads, head_dim] post-RoPE tensors.
LayerKVHook = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass(slots=True)
class PrefillChunk:
    """One sequence's chunk of prompt tokens inside the flat batch."""

    q_start: int  # first index of the chunk in the flat batch
    q_len: int
    context_len: int  # tokens of this sequence in the cache after this step (earlier chunks + this one)
    context_blocks: (
        torch.Tensor | None
    )  # blocks holding the context; None when the chunk is the whole context
    mask: torch.Tensor | None  # [q_len, context_len] bool, True where attention is allowed


@dataclass(slots=True)
class DecodeBatch:
    """Single-token decodes of similar context length at flat rows ``[row_start, row_start + num_seqs)``."""

    row_start: int
    num_seqs: int
    max_context: int
    block_ids: torch.Tensor  # [num_seqs * max_blocks] block tables, row-major, padded with block 0
    mask: torch.Tensor  # [num_seqs, 1, 1, max_context] additive: 0 on context, -inf on padding


@dataclass(slots=True)
class AttentionMetadata:
    """Where each new token's K/V goes and what each query attends to."""

    slot_mapping: torch.Tensor  # [num_tokens] cache slot of every new token
    decodes: list[DecodeBatch]
    prefills: list[PrefillChunk]


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse RoPE frequencies, with Llama-3 scaling applied when configured."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    """Grouped-query attention with fused q/k/v projection and a paged KV cache."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.block_size = 1  # set by the engine to its KV block size
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        on_kv: Callable[[torch.Tensor, torch.Tensor], None] | None,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        v = v.contiguous()
        if on_kv is not None:
            on_kv(k, v)
        # The cache is head-major ([kv_heads, slots, head_dim]) so that gathered blocks come out as
        # [kv_heads, tokens, head_dim] with contiguous rows, the layout attention reads.
        k_cache.index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
        v_cache.index_copy_(1, meta.slot_mapping, v.transpose(0, 1))
        k_blocks = k_cache.view(self.num_kv_heads, -1, self.block_size, self.head_dim)
        v_blocks = v_cache.view(self.num_kv_heads, -1, self.block_size, self.head_dim)

        out = torch.empty_like(q)
        for d in meta.decodes:
            per_seq = (self.num_kv_heads, d.num_seqs, -1, self.head_dim)
            # Gathering whole blocks copies block_size tokens per index: far cheaper than per-token gathers.
            keys = k_blocks.index_select(1, d.block_ids).view(per_seq)[:, :, : d.max_context].transpose(0, 1)
            values = (
                v_blocks.index_select(1, d.block_ids).view(per_seq)[:, :, : d.max_context].transpose(0, 1)
            )
            # Query heads sharing a KV head become that head's "query rows": GQA without repeating K/V.
            group = self.num_heads // self.num_kv_heads
            rows = slice(d.row_start, d.row_start + d.num_seqs)
            qd = q[rows].view(d.num_seqs, self.num_kv_heads, group, self.head_dim)
            att = F.scaled_dot_product_attention(qd, keys, values, attn_mask=d.mask)
            out[rows] = att.reshape(d.num_seqs, self.num_heads, self.head_dim)
        for chunk in meta.prefills:
            sl = slice(chunk.q_start, chunk.q_start + chunk.q_len)
            qc = q[sl].transpose(0, 1).unsqueeze(0)
            if chunk.context_blocks is None:
                keys, values = k[sl].transpose(0, 1), v[sl].transpose(0, 1)
            else:
                shape = (self.num_kv_heads, -1, self.head_dim)
                keys = k_blocks.index_select(1, chunk.context_blocks).view(shape)[:, : chunk.context_len]
                values = v_blocks.index_select(1, chunk.context_blocks).view(shape)[:, : chunk.context_len]
            att = F.scaled_dot_product_attention(
                qc,
                keys.unsqueeze(0),
                values.unsqueeze(0),
                attn_mask=chunk.mask,
                is_causal=chunk.mask is None and chunk.q_len > 1,
                enable_gqa=True,
            )
            out[sl] = att.squeeze(0).transpose(0, 1)
        return self.o_proj(out.view(num_tokens, self.q_size))


class MLP(nn.Module):
    """SwiGLU feed-forward with fused gate/up projection."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split([self.inter, self.inter], dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks with residuals."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm and LM head (tied or not)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = self.rope_tables(cfg)
        self.rope_cos: torch.Tensor
        self.rope_sin: torch.Tensor
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @staticmethod
    def rope_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos and sin tables, ``[max_position_embeddings, head_dim]``, always on CPU."""
        with torch.device("cpu"):
            inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
            freqs = torch.arange(cfg.max_position_embeddings).float()[:, None] * inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            return emb.cos(), emb.sin()

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        on_layer_kv: LayerKVHook | None = None,
    ) -> torch.Tensor:
        """Hidden states after the final norm, ``[num_tokens, hidden]``."""
        x = self.embed_tokens(input_ids)
        cos = self.rope_cos[positions].to(x.dtype).unsqueeze(1)
        sin = self.rope_sin[positions].to(x.dtype).unsqueeze(1)
        for idx, layer in enumerate(self.decoder_layers()):
            k_cache, v_cache = kv_caches[idx]
            on_kv = None if on_layer_kv is None else _bind_layer(on_layer_kv, idx)
            x = x + layer.self_attn(layer.input_layernorm(x), cos, sin, meta, k_cache, v_cache, on_kv)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.norm(x)

    def decoder_layers(self) -> list[DecoderLayer]:
        """The decoder layers, typed."""
        return [cast(DecoderLayer, layer) for layer in self.layers]

    def set_block_size(self, block_size: int) -> None:
        """Tell attention the KV cache's block size (tokens per block)."""
        for layer in self.decoder_layers():
            layer.self_attn.block_size = block_size

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits in fp32 for the given hidden states."""
        return self.lm_head(hidden).float()


def _bind_layer(hook: LayerKVHook, layer_idx: int) -> Callable[[torch.Tensor, torch.Tensor], None]:
    def call(k: torch.Tensor, v: torch.Tensor) -> None:
        hook(layer_idx, k.contiguous(), v.contiguous())

    return call
