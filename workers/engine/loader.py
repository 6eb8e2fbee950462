"""Load a Hugging Face style checkpoint directory: config, safetensors weights and tokenizer.

Reads ``config.json``; ``model.safetensors`` or the shards listed in
``model.safetensors.index.json``; ``tokenizer.json`` with ``tokenizer_config.json``
(eos/bos tokens, chat template) and ``generation_config.json`` when present. Every
failure is a ``CheckpointError`` that names the file and, where it applies, the
missing tensor or field. Needs ``safetensors`` and ``tokenizers``, never transformers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workers.engine.config import ModelConfig
from workers.engine.model import LlamaModel

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CheckpointError(ValueError):
    """A checkpoint file is missing or malformed; the message names the file (and tensor or field)."""


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object at top level")
    return data


def load_model_config(model_dir: str | Path) -> ModelConfig:
    """Parse and validate ``config.json`` (eos ids also from ``generation_config.json``)."""
    root = Path(model_dir)
    if not root.is_dir():
        raise CheckpointError(f"{root}: model directory not found")
    path = root / "config.json"
    raw = _read_json(path)
    gen_path = root / "generation_config.json"
    if gen_path.is_file() and raw.get("eos_token_id") is None:
        raw = {**raw, "eos_token_id": _read_json(gen_path).get("eos_token_id")}
    return ModelConfig.from_dict(raw, source=str(path))


def _weight_files(root: Path) -> tuple[list[Path], dict[str, Path]]:
    """The checkpoint's safetensors files, and the shard its index names for each tensor (empty without an index)."""
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: field 'weight_map' must be a non-empty object")
        listed = {name: root / str(file) for name, file in weight_map.items()}
        files = sorted(set(listed.values()))
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: shard listed in {index.name} not found")
        return files, listed
    single = root / "model.safetensors"
    if single.is_file():
        return [single], {}
    shards = sorted(root.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"{single}: file not found (and no *.safetensors or index in {root})")
    return shards, {}


@dataclass(frozen=True)
class _Checkpoint:
    """A checkpoint's tensors, and which file each came from (or, for one missing, which file should hold it)."""

    tensors: dict[str, torch.Tensor]
    files: dict[str, Path]
    pattern: str  # the weight file, or all of them, named where no file is known for a tensor

    def take(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """Tensor ``name``; CheckpointError naming its file if it is missing or not of ``shape``."""
        source = str(self.files.get(name, self.pattern))
        if name not in self.tensors:
            raise CheckpointError(f"{source}: missing tensor '{name}'")
        t = self.tensors[name]
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{source}: tensor '{name}' has shape {tuple(t.shape)}, expected {shape}")
        return t


def _load_checkpoint(root: Path) -> _Checkpoint:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    paths, listed = _weight_files(root)
    tensors: dict[str, torch.Tensor] = {}
    files = dict(listed)
    for path in paths:
        try:
            loaded = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: malformed safetensors file ({exc})") from exc
        tensors.update(loaded)
        files.update(dict.fromkeys(loaded, path))
    return _Checkpoint(tensors, files, str(paths[0]) if len(paths) == 1 else str(root / "*.safetensors"))


def load_state_dict(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint by Hugging Face name, on CPU."""
    return _load_checkpoint(Path(model_dir)).tensors


def load_model(model_dir: str | Path, device: str = "cpu", dtype: str | None = None) -> LlamaModel:
    """Build the model from ``config.json`` and the safetensors weights, fusing q/k/v and gate/up."""
    root = Path(model_dir)
    cfg = load_model_config(root)
    take = _load_checkpoint(root).take
    dtype_name = dtype or cfg.dtype_name
    if dtype is None and device == "cpu" and dtype_name != "float32":
        dtype_name = "float32"  # half-precision matmuls are slow or missing on CPU
    with torch.device("meta"):
        model = LlamaModel(cfg)
    h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    state: dict[str, torch.Tensor] = {
        "embed_tokens.weight": take("model.embed_tokens.weight", (cfg.vocab_size, h)),
        "norm.weight": take("model.norm.weight", (h,)),
    }
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    else:
        state["lm_head.weight"] = take("lm_head.weight", (cfg.vocab_size, h))
    for i in range(cfg.num_layers):
        p, d = f"model.layers.{i}.", f"layers.{i}."
        attn = [
            take(p + "self_attn.q_proj.weight", (q, h)),
            take(p + "self_attn.k_proj.weight", (kv, h)),
            take(p + "self_attn.v_proj.weight", (kv, h)),
        ]
        state[d + "self_attn.qkv_proj.weight"] = torch.cat(attn, dim=0)
        if cfg.qkv_bias:
            biases = [
                take(p + "self_attn.q_proj.bias", (q,)),
                take(p + "self_attn.k_proj.bias", (kv,)),
                take(p + "self_attn.v_proj.bias", (kv,)),
            ]
            state[d + "self_attn.qkv_proj.bias"] = torch.cat(biases, dim=0)
        state[d + "self_attn.o_proj.weight"] = take(p + "self_attn.o_proj.weight", (h, q))
        gate_up = [
            take(p + "mlp.gate_proj.weight", (cfg.intermediate_size, h)),
            take(p + "mlp.up_proj.weight", (cfg.intermediate_size, h)),
        ]
        state[d + "mlp.gate_up_proj.weight"] = torch.cat(gate_up, dim=0)
        state[d + "mlp.down_proj.weight"] = take(p + "mlp.down_proj.weight", (h, cfg.intermediate_size))
        state[d + "input_layernorm.weight"] = take(p + "input_layernorm.weight", (h,))
        state[d + "post_attention_layernorm.weight"] = take(p + "post_attention_layernorm.weight", (h,))
    target = _DTYPES[dtype_name]
    state = {k: v.to(device=device, dtype=target) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    # Buffers were created on the meta device; rebuild them for real on the target device.
    real = LlamaModel.rope_tables(cfg)
    model.rope_cos = real[0].to(device)
    model.rope_sin = real[1].to(device)
    return model.eval()


@dataclass(frozen=True)
class TokenizerInfo:
    """The tokenizer plus what ``tokenizer_config.json`` says about it."""

    tokenizer: Any  # tokenizers.Tokenizer
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    chat_template: str | None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without added special tokens."""
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, token_ids: list[int]) -> str:
        """Text of ``token_ids``, skipping special tokens."""
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))


def _token_name(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def load_tokenizer(model_dir: str | Path) -> TokenizerInfo:
    """Load ``tokenizer.json`` with eos/bos and chat template from ``tokenizer_config.json``."""
    from tokenizers import Tokenizer

    root = Path(model_dir)
    path = root / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on parse errors
        raise CheckpointError(f"{path}: malformed tokenizer ({exc})") from exc
    cfg_path = root / "tokenizer_config.json"
    tok_cfg = _read_json(cfg_path) if cfg_path.is_file() else {}
    eos_ids: list[int] = []
    bos_id: int | None = None
    eos_name = _token_name(tok_cfg.get("eos_token"))
    if eos_name is not None:
        eos_id = tok.token_to_id(eos_name)
        if eos_id is None:
            raise CheckpointError(f"{cfg_path}: eos_token '{eos_name}' is not in {path.name}")
        eos_ids.append(eos_id)
    bos_name = _token_name(tok_cfg.get("bos_token"))
    if bos_name is not None:
        bos_id = tok.token_to_id(bos_name)
    template = tok_cfg.get("chat_template")
    return TokenizerInfo(
        tokenizer=tok,
        eos_token_ids=tuple(eos_ids),
        bos_token_id=bos_id,
        chat_template=template if isinstance(template, str) else None,
    )
