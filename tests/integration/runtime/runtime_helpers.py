"""Helpers of the live-runtime tests: openai clients, worker lookup, polling."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai

from orchestrator.runtime import builder
from orchestrator.runtime.embedded import EmbeddedHandle
from workers.engine.config import EngineConfig
from workers.engine.engine import LLMEngine
from workers.engine.sampling_params import SamplingParams

NUM_KV_BLOCKS = 256


def client(handle: EmbeddedHandle) -> openai.OpenAI:
    """A synchronous openai client of ``handle``."""
    return openai.OpenAI(base_url=handle.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def async_client(handle: EmbeddedHandle) -> openai.AsyncOpenAI:
    """An async openai client of ``handle``."""
    return openai.AsyncOpenAI(base_url=handle.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def worker_actor(handle: EmbeddedHandle, instance_id: str) -> Any:
    """The Ray actor of a worker."""
    import ray

    return ray.get_actor(builder.worker_actor_name(handle.cluster.cluster, instance_id), namespace=handle.namespace)


def status(handle: EmbeddedHandle) -> dict[str, int]:
    """The controller's counters."""
    import ray

    return dict(ray.get(handle.controller.status.remote(), timeout=60))


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``predicate`` until true; fail with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.2)


def view_ids(handle: EmbeddedHandle) -> set[str]:
    """Healthy instance ids in the controller's current view."""
    import ray

    view = ray.get(handle.controller.get_view.remote(), timeout=60)
    return {i.instance_id for i in view.snapshot.instances if i.is_routable}


class Reference:
    """Greedy tokens and text of the engine in this process, for prompts given as text."""

    def __init__(self, model_dir: Path) -> None:
        from orchestrator.runtime.http.tokenizer import load_hf_tokenizer
        from workers.engine.loader import load_tokenizer

        self.engine = LLMEngine(model_dir, EngineConfig(num_blocks=NUM_KV_BLOCKS))
        self.tokenizer = load_hf_tokenizer(model_dir)
        self.decoder = load_tokenizer(model_dir)
        self._cache: dict[tuple[str, int, bool], tuple[tuple[int, ...], str]] = {}

    def complete(self, prompt: str, max_tokens: int, ignore_eos: bool = False) -> tuple[tuple[int, ...], str]:
        """Token ids and text the engine generates greedily for ``prompt``."""
        key = (prompt, max_tokens, ignore_eos)
        if key not in self._cache:
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
            params = SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos)
            out = self.engine.generate([ids], params)[0]
            self._cache[key] = (out.token_ids, self.decoder.decode(list(out.token_ids)))
        return self._cache[key]


def prompt_of(i: int, words: int = 40) -> str:
    """A deterministic prompt of roughly ``words`` words, distinct per ``i``."""
    vocab = ["prefill", "decode", "token", "cache", "block", "layer", "router", "worker", "batch", "stream"]
    return " ".join(vocab[(i * 7 + j * 3) % len(vocab)] + str((i + j) % 13) for j in range(words))
