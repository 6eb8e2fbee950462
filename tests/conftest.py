"""Shared fixtures: tiny models on disk, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

# The simulator runs its Python modules in-process even when its compiled build exists: some
# tests subclass ClusterSim, which compiled classes forbid (tests/sim/test_sim_native.py
# compares the two builds in subprocesses).
os.environ["PDSERVE_SIM_PURE"] = "1"

# One intra-op thread: tests share 2 cores, and logits are only bit-stable at a fixed thread count.
torch.set_num_threads(1)

HF_TINY_VOCAB = 4096


def _write_hf_model(directory: Path, architecture: str, seed: int, tie: bool) -> Path:
    """Save a randomly initialised transformers model plus pdserve's tokenizer into ``directory``."""
    import transformers

    from workers.engine.tiny import SPECIAL_TOKENS, build_tokenizer, write_tokenizer_files

    tokenizer = build_tokenizer(vocab_size=HF_TINY_VOCAB, seed=seed)
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    common: dict[str, Any] = dict(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_theta=50000.0,
        tie_word_embeddings=tie,
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
    )
    config: Any
    model_cls: Any
    if architecture == "Qwen2ForCausalLM":
        config = transformers.Qwen2Config(**common)
        model_cls = transformers.Qwen2ForCausalLM
    else:
        config = transformers.LlamaConfig(**common)
        model_cls = transformers.LlamaForCausalLM
    torch.manual_seed(seed)
    model = model_cls(config)
    if architecture == "Qwen2ForCausalLM":
        # Random biases, so that a loader ignoring them would be caught.
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.1)
    model.save_pretrained(directory)
    write_tokenizer_files(directory, tokenizer)
    return directory


@pytest.fixture(scope="session")
def hf_tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init Llama (GQA, untied) made and saved by transformers, with a tokenizer."""
    return _write_hf_model(tmp_path_factory.mktemp("hf-tiny-llama"), "LlamaForCausalLM", seed=0, tie=False)


@pytest.fixture(scope="session")
def hf_tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init Qwen2 (q/k/v bias, tied embeddings) made and saved by transformers."""
    return _write_hf_model(tmp_path_factory.mktemp("hf-tiny-qwen2"), "Qwen2ForCausalLM", seed=1, tie=True)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pdserve's own tiny Llama (``workers.engine.tiny``), with default sizes."""
    from workers.engine.tiny import create_tiny_model

    return create_tiny_model(tmp_path_factory.mktemp("pdserve-tiny-llama"))


@pytest.fixture(scope="session")
def metaspace_tokenizer() -> Any:
    """A SentencePiece-style BPE with Llama-2's normalizer and decoder, whose ``Strip`` drops one leading space."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    from workers.engine.tiny import SPECIAL_TOKENS, _training_corpus

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    tokenizer.train_from_iterator(_training_corpus(0, 3000), trainer)
    return tokenizer


@pytest.fixture(scope="session")
def metaspace_model_dir(tmp_path_factory: pytest.TempPathFactory, metaspace_tokenizer: Any) -> Path:
    """A small pdserve tiny Llama that ships ``metaspace_tokenizer`` (same special token ids)."""
    from workers.engine.tiny import create_tiny_model, write_tokenizer_files

    vocab_size = metaspace_tokenizer.get_vocab_size()
    directory = create_tiny_model(
        tmp_path_factory.mktemp("metaspace-tiny-llama"),
        vocab_size=vocab_size,
        hidden_size=64,
        num_layers=2,
        intermediate_size=128,
        max_position_embeddings=512,
    )
    write_tokenizer_files(directory, metaspace_tokenizer)
    return directory
