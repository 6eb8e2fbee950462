"""`start_embedded(device="cuda")`: workers on this machine's GPUs serve the CPU engine's greedy text.

One GPU is shared by both workers (torch_dist then pairs them over gloo through host memory); two or
more give each its own, and torch_dist pairs over NCCL.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from orchestrator.runtime.embedded import EmbeddedHandle, start_embedded
from workers.engine.config import EngineConfig
from workers.engine.engine import LLMEngine
from workers.engine.loader import load_tokenizer
from workers.engine.sampling_params import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

PROMPTS = [" ".join(f"word{(i * 7 + j) % 23}" for j in range(n)) for i, n in enumerate((3, 40, 200))]


@pytest.fixture(params=["tcp", "torch_dist"])
def live(request: pytest.FixtureRequest, tiny_model_dir: Path) -> Iterator[EmbeddedHandle]:
    import ray

    if ray.is_initialized():  # a Ray of logical GPUs would hand workers devices this machine lacks
        pytest.skip("needs a Ray of its own, offering this machine's GPUs")
    handle = start_embedded(model_dir=tiny_model_dir, device="cuda", transport=request.param, num_kv_blocks=256,
                            cluster_name=f"tcuda-{request.param}")
    yield handle
    handle.stop()


def test_cuda_workers_serve_the_cpu_engines_greedy_text(live: EmbeddedHandle, tiny_model_dir: Path) -> None:
    from orchestrator.runtime.http.tokenizer import load_hf_tokenizer

    tokenizer = load_hf_tokenizer(tiny_model_dir)
    decoder = load_tokenizer(tiny_model_dir)
    engine = LLMEngine(tiny_model_dir, EngineConfig(num_blocks=256))
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt, add_special_tokens=True)
        want = decoder.decode(list(engine.generate([ids], SamplingParams(max_tokens=16))[0].token_ids))
        body = {"model": live.model_dir.name, "prompt": prompt, "max_tokens": 16, "temperature": 0}
        reply = httpx.post(live.url + "/v1/completions", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == want
    metrics = httpx.get(live.url + "/metrics", timeout=10).text
    moved = [line for line in metrics.splitlines()
             if line.startswith(f'pdserve_kv_transfer_bytes_total{{transport="{live.cluster.transport}"}}')]
    assert moved and float(moved[0].split()[-1]) > 0  # the 200-word prompt went through a prefill worker
    assert live.cluster.device == "cuda"
    assert live.cluster.num_gpus_per_worker == (1.0 if torch.cuda.device_count() >= 2 else 0.5)
