"""Greedy tokens of pdserve's engine equal transformers' own greedy generate on the same weights."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from workers.engine.config import EngineConfig, KVReads
from workers.engine.engine import LLMEngine
from workers.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

# 20 prompts from 1 to several hundred tokens, each with its own output length.
PROMPT_LENS = [1, 2, 3, 5, 8, 13, 17, 31, 40, 64, 65, 100, 127, 150, 200, 256, 257, 300, 380, 450]


def _cases(vocab: int) -> list[tuple[list[int], int]]:
    rng = random.Random(1234)
    return [([rng.randrange(3, vocab) for _ in range(n)], 4 + i % 9) for i, n in enumerate(PROMPT_LENS)]


def _hf_greedy(model_dir: Path, cases: list[tuple[list[int], int]]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    outs = []
    with torch.no_grad():
        for prompt, max_new in cases:
            ids = torch.tensor([prompt])
            gen = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False
            )
            outs.append(gen[0, len(prompt) :].tolist())
    return outs


@pytest.fixture(scope="module")
def cases_and_reference(hf_tiny_model_dir: Path) -> tuple[list[tuple[list[int], int]], list[list[int]]]:
    from workers.engine.loader import load_model_config

    cases = _cases(load_model_config(hf_tiny_model_dir).vocab_size)
    return cases, _hf_greedy(hf_tiny_model_dir, cases)


def _run_all(engine: LLMEngine, cases: list[tuple[list[int], int]]) -> list[list[int]]:
    for i, (prompt, max_new) in enumerate(cases):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=max_new))
    got: dict[str, list[int]] = {f"r{i}": [] for i in range(len(cases))}
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id].extend(out.new_token_ids)
    return [got[f"r{i}"] for i in range(len(cases))]


def test_one_at_a_time_matches_transformers(hf_tiny_model_dir: Path, cases_and_reference) -> None:
    cases, reference = cases_and_reference
    engine = LLMEngine(hf_tiny_model_dir, EngineConfig(num_blocks=64, block_size=16))
    for i, ((prompt, max_new), expected) in enumerate(zip(cases, reference, strict=True)):
        (result,) = engine.generate([prompt], SamplingParams(max_tokens=max_new))
        assert list(result.token_ids) == expected, f"prompt {i} ({len(prompt)} tokens)"
        assert engine.free_blocks == engine.total_blocks, f"blocks leaked after prompt {i}"


@pytest.mark.parametrize("kv_reads", [KVReads.VIEWS, KVReads.GATHER])
def test_batched_with_chunked_prefill_matches_transformers(
    hf_tiny_model_dir: Path, cases_and_reference, kv_reads: KVReads
) -> None:
    cases, reference = cases_and_reference
    # A 64-token budget splits every long prompt into chunks and mixes them with decodes.
    config = EngineConfig(num_blocks=512, max_num_batched_tokens=64, kv_reads=kv_reads)
    engine = LLMEngine(hf_tiny_model_dir, config)
    assert _run_all(engine, cases) == reference
    assert engine.free_blocks == engine.total_blocks
    assert engine.num_preemptions == 0


def test_preemption_under_tiny_block_budget_matches_transformers(
    hf_tiny_model_dir: Path, cases_and_reference
) -> None:
    cases, reference = cases_and_reference
    # 130 blocks of 4 tokens hold the longest request (450 + 12) but not all 20 at once.
    engine = LLMEngine(
        hf_tiny_model_dir, EngineConfig(num_blocks=130, block_size=4, max_num_batched_tokens=128)
    )
    assert _run_all(engine, cases) == reference
    assert engine.num_preemptions > 0
    assert engine.free_blocks == engine.total_blocks


def test_qwen2_bias_and_tied_embeddings_match_transformers(hf_tiny_qwen2_dir: Path) -> None:
    from workers.engine.loader import load_model_config

    cfg = load_model_config(hf_tiny_qwen2_dir)
    assert cfg.qkv_bias and cfg.tie_word_embeddings
    cases = _cases(cfg.vocab_size)[::4]
    reference = _hf_greedy(hf_tiny_qwen2_dir, cases)
    engine = LLMEngine(hf_tiny_qwen2_dir, EngineConfig(num_blocks=256, max_num_batched_tokens=96))
    assert _run_all(engine, cases) == reference
