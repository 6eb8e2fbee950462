"""A Llama-family decoder over a flat batch of tokens with a paged KV cache.

One forward runs every token scheduled in a step, flattened: decode tokens first
(one per sequence), then prefill chunks. Dense layers (projections, MLP, norms)
run once over all of them; attention runs per kind of work: one call per decode
whose context is read in place (a view of consecutive cache slots), one padded
call per group of gathered decodes of similar context length, one call per
prefill chunk. New K/V are written into their cache slots before attention, so a
chunk attends to earlier chunks through the cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from workers.engine.config import ModelConfig, RopeScaling
from workers.engine.lm_head import PackedLMHead, pack_lm_head

# Row counts for which CPU logits are computed as weight @ hidden.T when the LM head is stored
# row-major (see LlamaModel.logits): measured with MKL on AVX-512, [rows, hidden] @ weight.T over a
# row-major weight is up to 2x slower there. A column-major head (see use_column_major_weights) beats both.
_SKINNY_LOGITS_ROWS = range(4, 29)

# Called as on_layer_kv(layer_idx, k, v) with [num_tokens, num_kv_heads, head_dim] post-RoPE tensors.
LayerKVHook = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass(slots=True)
class PrefillChunk:
    """One sequence's chunk of prompt tokens inside the flat batch.

    Attention reads the earlier context from ``context_slot`` (a view of consecutive cache
    slots) or else from ``context_blocks`` (a gather); with neither set the chunk is the
    whole context and attends to its own fresh K/V.
    """

    q_start: int  # first index of the chunk in the flat batch
    q_len: int
    context_len: int  # tokens of this sequence in the cache after this step (earlier chunks + this one)
    context_blocks: torch.Tensor | None  # blocks holding the context, to gather
    mask: torch.Tensor | None  # [q_len, context_len] additive: 0 where attention is allowed, -inf elsewhere
    context_slot: int | None = None  # first cache slot of a context held in consecutive slots


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
    """Where each new token's K/V goes and what each query attends to.

    Flat rows are, in order: ``view_decodes`` (one per row from row 0), the rows of each
    ``decodes`` group, then the ``prefills`` chunks.
    """

    slot_mapping: torch.Tensor  # [num_tokens] cache slot of every new token
    decodes: list[DecodeBatch]
    prefills: list[PrefillChunk]
    # (first cache slot, context length) of single-token decodes whose context sits in consecutive
    # slots: attention reads them in place, one call each, with no copy.
    view_decodes: list[tuple[int, int]] = field(default_factory=list)


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
        x32 = x.float()  # x itself when already fp32: never written in place
        scale = x32.pow(2).mean(-1, keepdim=True).add_(self.eps).rsqrt_()
        # The same operations as weight * (x * rsqrt(mean(x^2) + eps)), on fresh tensors in place.
        return (x32 * scale).to(dtype).mul_(self.weight)


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
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)
        # q and k rotate together: one RoPE over [tokens, heads + kv_heads, head_dim].
        qk = qkv[:, : self.q_size + self.kv_size].view(num_tokens, heads + kv_heads, head_dim)
        qk = (qk * cos).add_(qk.roll(head_dim // 2, -1).mul_(sin))
        q, k = qk[:, :heads], qk[:, heads:]
        v = qkv[:, self.q_size + self.kv_size :].view(num_tokens, kv_heads, head_dim)
        if on_kv is not None:
            on_kv(k, v)
        # The cache is head-major ([kv_heads, slots, head_dim]) so that a run of slots, viewed or
        # gathered, comes out as [kv_heads, tokens, head_dim] with contiguous rows, the layout attention reads.
        k_cache.index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
        v_cache.index_copy_(1, meta.slot_mapping, v.transpose(0, 1))

        parts: list[torch.Tensor] = []  # attention outputs in flat-row order, [rows, heads, head_dim] each
        # Query heads sharing a KV head become that head's "query rows": GQA without repeating K/V.
        group = heads // kv_heads
        if meta.view_decodes:
            n = len(meta.view_decodes)
            q_rows = q[:n].reshape(n, kv_heads, group, head_dim).split(1)
            k_all, v_all = k_cache.unsqueeze(0), v_cache.unsqueeze(0)
            sdpa = F.scaled_dot_product_attention
            atts = [
                sdpa(qi, k_all.narrow(2, slot, length), v_all.narrow(2, slot, length))
                for qi, (slot, length) in zip(q_rows, meta.view_decodes, strict=True)
            ]
            parts.append(torch.cat(atts).view(n, heads, head_dim))
        if meta.decodes:
            k_blocks = k_cache.view(kv_heads, -1, self.block_size, head_dim)
            v_blocks = v_cache.view(kv_heads, -1, self.block_size, head_dim)
            for d in meta.decodes:
                per_seq = (kv_heads, d.num_seqs, -1, head_dim)
                # Gathering whole blocks copies block_size tokens per index: far cheaper than per-token gathers.
                keys = k_blocks.index_select(1, d.block_ids).view(per_seq)[:, :, : d.max_context]
                values = v_blocks.index_select(1, d.block_ids).view(per_seq)[:, :, : d.max_context]
                qd = q[d.row_start : d.row_start + d.num_seqs].reshape(d.num_seqs, kv_heads, group, head_dim)
                att = F.scaled_dot_product_attention(
                    qd, keys.transpose(0, 1), values.transpose(0, 1), attn_mask=d.mask
                )
                parts.append(att.reshape(d.num_seqs, heads, head_dim))
        for chunk in meta.prefills:
            sl = slice(chunk.q_start, chunk.q_start + chunk.q_len)
            keys, values = self._context(chunk, k[sl], v[sl], k_cache, v_cache)
            att = F.scaled_dot_product_attention(
                q[sl].transpose(0, 1).unsqueeze(0),
                keys.unsqueeze(0),
                values.unsqueeze(0),
                attn_mask=chunk.mask,
                is_causal=chunk.mask is None and chunk.q_len > 1,
                enable_gqa=True,
            )
            parts.append(att.squeeze(0).transpose(0, 1))
        out = torch.cat(parts) if len(parts) > 1 else parts[0]
        return self.o_proj(out.reshape(num_tokens, self.q_size))

    def _context(
        self,
        chunk: PrefillChunk,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V a prefill chunk attends to, ``[kv_heads, context_len, head_dim]`` each."""
        if chunk.context_slot is not None:
            span = slice(chunk.context_slot, chunk.context_slot + chunk.context_len)
            return k_cache[:, span], v_cache[:, span]
        if chunk.context_blocks is not None:
            shape = (self.num_kv_heads, -1, self.head_dim)
            k_blocks = k_cache.view(self.num_kv_heads, -1, self.block_size, self.head_dim)
            v_blocks = v_cache.view(self.num_kv_heads, -1, self.block_size, self.head_dim)
            keys = k_blocks.index_select(1, chunk.context_blocks).view(shape)[:, : chunk.context_len]
            values = v_blocks.index_select(1, chunk.context_blocks).view(shape)[:, : chunk.context_len]
            return keys, values
        return k.transpose(0, 1), v.transpose(0, 1)


class MLP(nn.Module):
    """SwiGLU feed-forward with fused gate/up projection."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split([self.inter, self.inter], dim=-1)
        return self.down_proj(F.silu(gate, inplace=True).mul_(up))


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
        self.packed_head: PackedLMHead | None = None  # see pack_lm_head
        cos, sin = self.rope_tables(cfg)
        self.rope_cos: torch.Tensor
        self.rope_sin: torch.Tensor
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @staticmethod
    def rope_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos and signed sin tables, ``[max_position_embeddings, head_dim]``, always on CPU.

        The sin table's first half is negated, so a rotation is ``x * cos + x.roll(head_dim // 2, -1) * sin``:
        the same products as ``x * cos + rotate_half(x) * sin`` (negation is exact), in fewer ops.
        """
        with torch.device("cpu"):
            inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
            freqs = torch.arange(cfg.max_position_embeddings).float()[:, None] * inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            sin = emb.sin()
            sin[:, : cfg.head_dim // 2].neg_()
            return emb.cos(), sin

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
            # x is this forward's own tensor (the embedding lookup allocates it): residuals add in place.
            x.add_(layer.self_attn(layer.input_layernorm(x), cos, sin, meta, k_cache, v_cache, on_kv))
            x.add_(layer.mlp(layer.post_attention_layernorm(x)))
        return self.norm(x)

    def decoder_layers(self) -> list[DecoderLayer]:
        """The decoder layers, typed."""
        return [cast(DecoderLayer, layer) for layer in self.layers]

    def set_block_size(self, block_size: int) -> None:
        """Tell attention the KV cache's block size (tokens per block)."""
        for layer in self.decoder_layers():
            layer.self_attn.block_size = block_size

    def use_column_major_weights(self) -> int:
        """Store projection weights column-major (``[in, out]`` contiguous); returns how many it changed.

        On CPU, ``x @ W.T`` over that layout is faster at decode-sized row counts and about as
        fast at prefill-sized ones (measured with MKL on AVX-512, one thread, tiny Llama shapes:
        16 rows 1.1-2.3x for the decoder's projections and ~20% for the 32k-vocab LM head; 512
        rows within noise), with bit-identical results on the shapes measured. Logits then come
        out row-major, the layout the sampler scans fastest. Parameters keep their shapes and
        values; only their strides change. A tied LM head stays row-major: the embedding lookup
        reads rows of that tensor.
        """
        changed = 0
        for module in self.modules():
            if not isinstance(module, nn.Linear) or module.weight is self.embed_tokens.weight:
                continue
            weight = module.weight.detach()
            if weight.is_contiguous():
                module.weight = nn.Parameter(weight.t().contiguous().t(), requires_grad=False)
                changed += 1
        return changed

    def pack_lm_head(self) -> bool:
        """Give ``logits`` a panel-packed copy of the LM head for the compiled CPU kernel; whether it got one.

        The copy is a snapshot: call this after the weights are final (the engine does, once loaded).
        None without a current build of the kernel, or for a head that is not fp32 on CPU.
        """
        self.packed_head = pack_lm_head(self.lm_head.weight)
        return self.packed_head is not None

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits in fp32 for the given hidden states."""
        if self.packed_head is not None and self.packed_head.applies(hidden):
            return self.packed_head(hidden)
        weight = self.lm_head.weight
        if weight.is_contiguous() and hidden.device.type == "cpu" and hidden.shape[0] in _SKINNY_LOGITS_ROWS:
            # [vocab, hidden] @ [hidden, rows]: the same products, but a kernel that streams the large
            # weight once instead of repacking it. The result is a transposed view.
            return torch.mm(weight, hidden.t()).t().float()
        return F.linear(hidden, weight).float()


def _bind_layer(hook: LayerKVHook, layer_idx: int) -> Callable[[torch.Tensor, torch.Tensor], None]:
    def call(k: torch.Tensor, v: torch.Tensor) -> None:
        hook(layer_idx, k.contiguous(), v.contiguous())

    return call
