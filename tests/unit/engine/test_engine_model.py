"""Model math rewritten for speed gives the textbook results: RoPE, RMSNorm and logits at every row count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from workers.engine.config import ModelConfig
from workers.engine.model import LlamaModel, RMSNorm, rope_inv_freq


def _config(vocab: int = 3000) -> ModelConfig:
    return ModelConfig.from_dict(
        {
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": vocab,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 128,
        }
    )


def test_signed_sin_roll_is_exactly_rotate_half() -> None:
    cfg = _config()
    cos, signed_sin = LlamaModel.rope_tables(cfg)
    half = cfg.head_dim // 2
    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, None)
    angles = torch.arange(cfg.max_position_embeddings).float()[:, None] * inv_freq[None, :]
    sin = torch.cat((angles, angles), dim=-1).sin()  # the textbook table, unsigned
    assert torch.equal(cos, torch.cat((angles, angles), dim=-1).cos())
    positions = torch.tensor([0, 1, 7, 100])
    x = torch.randn(4, 6, cfg.head_dim, generator=torch.Generator().manual_seed(0))
    c, s, ss = cos[positions, None], sin[positions, None], signed_sin[positions, None]
    rotate_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    assert torch.equal(x * c + rotate_half * s, (x * c).add_(x.roll(half, -1).mul_(ss)))


def test_rms_norm_matches_the_formula_and_leaves_its_input_alone() -> None:
    norm = RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 64))
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    before = x.clone()
    expected = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    assert torch.equal(norm(x), expected)
    assert torch.equal(x, before)


@pytest.mark.parametrize("rows", [1, 3, 4, 16, 28, 29, 64])
def test_logits_equal_the_plain_projection_at_every_row_count(rows: int) -> None:
    model = LlamaModel(_config())
    torch.nn.init.normal_(model.lm_head.weight, std=0.05)
    hidden = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows))
    logits = model.logits(hidden)
    expected = F.linear(hidden, model.lm_head.weight)
    assert logits.shape == (rows, 3000) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(logits.max(dim=-1).indices, expected.max(dim=-1).indices)


@pytest.mark.parametrize("rows", [1, 3, 4, 16, 28, 29, 64])
def test_column_major_weights_keep_values_and_logits(rows: int) -> None:
    model = LlamaModel(_config())
    torch.nn.init.normal_(model.lm_head.weight, std=0.05)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    hidden = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows))
    expected = F.linear(hidden, before["lm_head.weight"])
    mlp = model.decoder_layers()[0].mlp
    with torch.inference_mode():
        expected_mlp = mlp(hidden)
    assert model.use_column_major_weights() == 5  # qkv, o, gate/up and down of the layer, and the head
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name
        if param.dim() == 2 and name != "embed_tokens.weight":
            assert param.stride() == (1, param.shape[0]), name
    with torch.inference_mode():
        torch.testing.assert_close(mlp(hidden), expected_mlp, rtol=1e-5, atol=1e-6)
    logits = model.logits(hidden)
    assert logits.shape == (rows, 3000) and logits.is_contiguous()
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(logits.max(dim=-1).indices, expected.max(dim=-1).indices)


def test_a_tied_lm_head_stays_row_major() -> None:
    cfg = ModelConfig.from_dict(
        {
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 300,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "max_position_embeddings": 128,
            "tie_word_embeddings": True,
        }
    )
    model = LlamaModel(cfg)
    assert model.use_column_major_weights() == 4  # the layer's projections, not the head
    assert model.lm_head.weight is model.embed_tokens.weight and model.lm_head.weight.is_contiguous()
