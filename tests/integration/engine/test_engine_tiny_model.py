"""pdserve's tiny model creator: transformers loads what it writes and agrees on greedy tokens."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import pytest
import torch

from workers.engine.config import EngineConfig
from workers.engine.engine import LLMEngine
from workers.engine.sampling_params import SamplingParams
from workers.engine.tiny import TINY_MODEL_DIRNAME, create_tiny_model, ensure_tiny_model

pytestmark = pytest.mark.slow


def test_tiny_model_files_and_sizes(tiny_model_dir: Path) -> None:
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (256, 4, 4)
    assert config["num_key_value_heads"] == 2 and config["max_position_embeddings"] == 4096
    assert config["vocab_size"] == 32000
    tok_config = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    assert "chat_template" in tok_config and tok_config["eos_token"] == "</s>"


def test_transformers_loads_tiny_model_and_agrees(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    hf_tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    engine = LLMEngine(tiny_model_dir, EngineConfig(num_blocks=64))
    assert engine.tokenizer is not None
    texts = ["Hello, how are you today?", "The key-value cache is stored in fixed-size blocks.", "7"]
    for text in texts:
        ids = engine.tokenizer.encode(text)
        assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=10,
                do_sample=False,
            )[0, len(ids) :].tolist()
        (ours,) = engine.generate([ids], SamplingParams(max_tokens=10))
        assert list(ours.token_ids) == ref
    chat = hf_tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<s><|user|>\nhi</s>\n<|assistant|>\n"


def test_same_seed_same_weights(tmp_path: Path) -> None:
    a = create_tiny_model(tmp_path / "a", seed=5, vocab_size=1000, num_layers=1)
    b = create_tiny_model(tmp_path / "b", seed=5, vocab_size=1000, num_layers=1)
    c = create_tiny_model(tmp_path / "c", seed=6, vocab_size=1000, num_layers=1, tie_word_embeddings=True)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    engine = LLMEngine(c, EngineConfig(num_blocks=16))
    assert engine.model.lm_head.weight is engine.model.embed_tokens.weight


def _ensure(cache: str, queue: mp.Queue) -> None:  # type: ignore[type-arg]
    torch.set_num_threads(1)
    queue.put(str(ensure_tiny_model(cache)))


def test_ensure_tiny_model_is_idempotent_under_a_race(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")  # the parent already imported torch; spawn would redo it
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ensure, args=(str(tmp_path), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    paths = {queue.get(timeout=5) for _ in procs}
    final = tmp_path / TINY_MODEL_DIRNAME
    assert paths == {str(final)}
    assert sorted(p.name for p in tmp_path.iterdir()) == [TINY_MODEL_DIRNAME]  # no staging left behind
    stamp = (final / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(tmp_path) == final
    assert (final / "model.safetensors").stat().st_mtime_ns == stamp
    LLMEngine(final, EngineConfig(num_blocks=8))  # loads
