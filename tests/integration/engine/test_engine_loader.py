"""Loader: real checkpoint directories, sharded weights, and errors that name the file and tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from workers.engine.config import ModelConfigError, UnsupportedArchitecture
from workers.engine.engine import LLMEngine
from workers.engine.loader import CheckpointError, load_model, load_state_dict, load_tokenizer


@pytest.fixture
def model_copy(hf_tiny_model_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(hf_tiny_model_dir, dst)
    return dst


def test_missing_config_json_is_named(model_copy: Path) -> None:
    (model_copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: file not found"):
        LLMEngine(model_copy)


def test_malformed_config_json_is_named(model_copy: Path) -> None:
    (model_copy / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_model(model_copy)


def test_unsupported_architecture_is_named(model_copy: Path) -> None:
    path = model_copy / "config.json"
    raw = json.loads(path.read_text())
    raw["architectures"] = ["FalconForCausalLM"]
    path.write_text(json.dumps(raw))
    with pytest.raises(UnsupportedArchitecture, match=r"config\.json: architecture 'FalconForCausalLM'"):
        LLMEngine(model_copy)


def test_missing_config_field_is_named(model_copy: Path) -> None:
    path = model_copy / "config.json"
    raw = json.loads(path.read_text())
    del raw["num_hidden_layers"]
    path.write_text(json.dumps(raw))
    with pytest.raises(ModelConfigError, match=r"config\.json: field 'num_hidden_layers'"):
        load_model(model_copy)


def test_malformed_safetensors_is_named(model_copy: Path) -> None:
    (model_copy / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: malformed safetensors"):
        load_model(model_copy)


def test_missing_weights_file_is_named(model_copy: Path) -> None:
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: file not found"):
        load_model(model_copy)


def test_missing_tensor_is_named(model_copy: Path) -> None:
    from safetensors.torch import save_file

    tensors = load_state_dict(model_copy)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(model_copy / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load_model(model_copy)


def test_wrong_tensor_shape_is_named(model_copy: Path) -> None:
    from safetensors.torch import save_file

    tensors = load_state_dict(model_copy)
    tensors["model.norm.weight"] = torch.ones(3)
    save_file(tensors, str(model_copy / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' has shape \(3,\)"):
        load_model(model_copy)


def test_sharded_checkpoint_loads_identically(hf_tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(hf_tiny_model_dir).save_pretrained(sharded, max_shard_size="1MB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    a, b = load_model(hf_tiny_model_dir).state_dict(), load_model(sharded).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    index = sharded / "model.safetensors.index.json"
    shard = sorted(sharded.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}: shard listed in {index.name} not found"):
        load_model(sharded)


def test_tokenizer_files(model_copy: Path) -> None:
    info = load_tokenizer(model_copy)
    assert info.eos_token_ids == (info.tokenizer.token_to_id("</s>"),)
    assert info.chat_template is not None and "add_generation_prompt" in info.chat_template
    assert info.decode(info.encode("hello world")) == "hello world"
    (model_copy / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: malformed tokenizer"):
        load_tokenizer(model_copy)
    (model_copy / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: file not found"):
        load_tokenizer(model_copy)


def test_a_tensor_missing_from_its_shard_names_that_shard(hf_tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(hf_tiny_model_dir).save_pretrained(sharded, max_shard_size="1MB")
    weight_map = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    shard = sharded / weight_map["model.norm.weight"]
    tensors = load_file(str(shard))
    del tensors["model.norm.weight"]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"{shard.name}: missing tensor 'model.norm.weight'"):
        load_model(sharded)
