"""A real uvicorn server over ``LocalEngineBackend`` on the tiny model, shared by this package's tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from http_live_support import ENGINE_CONFIG, MODEL, LiveServer

from orchestrator.runtime.http import ServerLimits, create_app, serve
from orchestrator.runtime.http.tokenizer import load_hf_tokenizer
from orchestrator.runtime.local_backend import LocalEngineBackend
from orchestrator.runtime.metrics import ServingMetrics
from workers.engine.engine import LLMEngine
from workers.engine.tiny import ensure_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    torch.set_num_threads(1)
    return ensure_tiny_model()


@pytest.fixture(scope="session")
def reference_engine(tiny_model_dir: Path) -> LLMEngine:
    """A second engine on the same weights, driven directly, for expected outputs."""
    return LLMEngine(tiny_model_dir, ENGINE_CONFIG)


@pytest.fixture(scope="session")
def live(tiny_model_dir: Path) -> Iterator[LiveServer]:
    engine = LLMEngine(tiny_model_dir, ENGINE_CONFIG)
    metrics = ServingMetrics()
    backend = LocalEngineBackend(engine, metrics=metrics)
    tokenizer = load_hf_tokenizer(tiny_model_dir)
    # The SLO classes the tests in this package send (bench-e2e, metrics-test).
    limits = ServerLimits(max_context_tokens=engine.max_model_len,
                          slo_classes=frozenset({"default", "bench-e2e", "metrics-test"}))
    app = create_app(backend, tokenizer, MODEL, api_key="", metrics=metrics, limits=limits)
    handle = serve(app, "127.0.0.1", 0)
    try:
        yield LiveServer(handle, engine, backend, metrics, tokenizer)
    finally:
        handle.stop()
        backend.close()
