"""The engine on CUDA gives the same greedy tokens as on CPU (runs only where CUDA exists)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from workers.engine.config import EngineConfig
from workers.engine.engine import LLMEngine
from workers.engine.sampling_params import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_cuda_greedy_matches_cpu(hf_tiny_model_dir: Path) -> None:
    prompts = [[5 + i for i in range(n)] for n in (1, 17, 90, 300)]
    sampling = SamplingParams(max_tokens=12)
    cpu = LLMEngine(hf_tiny_model_dir, EngineConfig(num_blocks=128, max_num_batched_tokens=64))
    gpu = LLMEngine(hf_tiny_model_dir, EngineConfig(device="cuda", num_blocks=128, max_num_batched_tokens=64))
    assert gpu.kv_cache.layers[0][0].is_cuda
    assert [r.token_ids for r in gpu.generate(prompts, sampling)] == [
        r.token_ids for r in cpu.generate(prompts, sampling)
    ]
    assert gpu.free_blocks == gpu.total_blocks


def test_cuda_bf16_runs_and_reports_layout(hf_tiny_model_dir: Path) -> None:
    engine = LLMEngine(hf_tiny_model_dir, EngineConfig(device="cuda", dtype="bfloat16", num_blocks=64))
    assert engine.kv_layout.dtype == torch.bfloat16
    assert engine.kv_layout.bytes_per_token_per_layer == 2 * 2 * 32 * 2
    (result,) = engine.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=8, ignore_eos=True))
    assert len(result.token_ids) == 8
