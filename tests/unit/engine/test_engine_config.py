"""config.json parsing: both RoPE layouts, Llama-3 scaling, and errors that name the field."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from workers.engine.config import (
    EngineConfig,
    KVReads,
    ModelConfig,
    ModelConfigError,
    UnsupportedArchitecture,
)
from workers.engine.kv_layout import KVLayout
from workers.engine.model import rope_inv_freq


def _raw(**over: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 100,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
    }
    raw.update(over)
    return raw


def test_defaults_and_both_rope_layouts() -> None:
    cfg = ModelConfig.from_dict(_raw(rope_theta=5e5))
    assert (cfg.head_dim, cfg.rope_theta, cfg.qkv_bias, cfg.tie_word_embeddings) == (16, 5e5, False, False)
    new = ModelConfig.from_dict(_raw(rope_parameters={"rope_theta": 1234.0, "rope_type": "default"}))
    assert new.rope_theta == 1234.0 and new.rope_scaling is None
    qwen = ModelConfig.from_dict(_raw(architectures=["Qwen2ForCausalLM"], eos_token_id=[5, 6]))
    assert qwen.qkv_bias and qwen.eos_token_ids == (5, 6)


@pytest.mark.slow  # imports transformers
def test_llama3_rope_scaling_matches_transformers() -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    cfg = ModelConfig.from_dict(_raw(rope_theta=5e5, rope_scaling=scaling))
    assert cfg.rope_scaling is not None
    ours = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    hf_cfg = LlamaConfig(**_raw(rope_parameters={"rope_theta": 5e5, **scaling}))
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, rope_inv_freq(cfg.head_dim, cfg.rope_theta, None))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "architecture 'GPT2LMHeadModel' is not supported"),
        ({"architectures": []}, "'architectures'"),
        ({"hidden_size": None}, "'hidden_size'"),
        ({"vocab_size": -3}, "'vocab_size'"),
        ({"num_key_value_heads": 3}, "'num_key_value_heads'"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope type 'yarn'"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 2.0}}, "lacks field 'low_freq_factor'"),
        ({"dtype": "int8"}, "'dtype'"),
        ({"num_key_value_heads": -2}, "'num_key_value_heads' must be an integer >= 1"),
        ({"head_dim": -64}, "'head_dim' must be an integer >= 1"),
        ({"head_dim": 63}, "'head_dim' must be an even integer"),
        ({"rms_norm_eps": None}, "'rms_norm_eps' must be a positive number"),
        ({"rms_norm_eps": "1e-6x"}, "'rms_norm_eps' must be a positive number"),
        ({"rope_scaling": "linear"}, "'rope_scaling' must be an object or null"),
        (
            {"rope_scaling": {"rope_type": "llama3", "factor": "x", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 64}},
            "llama3 rope scaling has a field that is not a number",
        ),
        ({"mlp_bias": True}, "'mlp_bias' = true is not supported"),
        ({"hidden_act": "gelu"}, "'hidden_act' = 'gelu' is not supported"),
        ({"eos_token_id": "</s>"}, "'eos_token_id' must be a token id"),
        ({"eos_token_id": [2, None]}, "'eos_token_id' must be a token id"),
    ],
)
def test_bad_fields_are_named(override: dict[str, Any], message: str) -> None:
    with pytest.raises(ModelConfigError, match=message) as info:
        ModelConfig.from_dict(_raw(**override), source="/m/config.json")
    assert "/m/config.json" in str(info.value)


def test_unsupported_architecture_has_its_own_type() -> None:
    with pytest.raises(UnsupportedArchitecture, match="LlamaForCausalLM"):
        ModelConfig.from_dict(_raw(architectures=["MambaForCausalLM"]))


def test_engine_config_validates_knobs() -> None:
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(block_size=0)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        EngineConfig(max_num_batched_tokens=0)
    with pytest.raises(ValueError, match="kv_reads must be one of"):
        EngineConfig(kv_reads="views")  # type: ignore[arg-type]
    assert EngineConfig(kv_reads=KVReads.GATHER).kv_reads is KVReads.GATHER


def test_kv_layout_bytes() -> None:
    layout = KVLayout(num_layers=4, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32)
    assert layout.bytes_per_token_per_layer == 2 * 2 * 64 * 4
    assert layout.bytes_per_block == 16 * 4 * 1024
    half = KVLayout(num_layers=1, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.bfloat16)
    assert half.bytes_per_token_per_layer == 512
