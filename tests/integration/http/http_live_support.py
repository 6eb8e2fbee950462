"""Constants and the ``LiveServer`` record shared by the HTTP integration tests and their fixtures."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.runtime.http import ServerHandle
from orchestrator.runtime.http.tokenizer import HFTokenizer
from orchestrator.runtime.local_backend import LocalEngineBackend
from orchestrator.runtime.metrics import ServingMetrics
from workers.engine.config import EngineConfig
from workers.engine.engine import LLMEngine

MODEL = "tiny-llama"
CONTEXT_TOKENS = 2048
ENGINE_CONFIG = EngineConfig(kv_cache_bytes=64 * 1024 * 1024, max_model_len=CONTEXT_TOKENS, num_threads=1)


@dataclass
class LiveServer:
    """The running server and what tests inspect behind it."""

    handle: ServerHandle
    engine: LLMEngine
    backend: LocalEngineBackend
    metrics: ServingMetrics
    tokenizer: HFTokenizer

    @property
    def url(self) -> str:
        return self.handle.url
