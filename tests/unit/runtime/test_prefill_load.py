"""A prefill worker's load report (the controller's health probe) while its engine thread is busy.

Real engine (tiny model), real engine loop, real gRPC server and client, real tcp KV receivers in this process.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from orchestrator.core.types import Role
from orchestrator.runtime.worker_client import WorkerCallError, WorkerClient
from workers.engine.config import EngineConfig, EngineRole
from workers.engine.engine import LLMEngine
from workers.engine.sampling_params import SamplingParams
from workers.kv.interface import KVEndpoint
from workers.kv.registry import KVClient, open_endpoint
from workers.service.decode import engine_load, kv_spec
from workers.service.engine_loop import EngineLoop, EngineStopped
from workers.service.prefill import PrefillWorker
from workers.service.server import WorkerServer

NUM_PROMPTS = 12
PROMPT_TOKENS = 512
SAMPLING = SamplingParams(max_tokens=1)
PROBE_TIMEOUT_S = 2.0  # the controller's ControllerConfig.probe_timeout_s
PROMPT_PROBE_S = 0.5  # a prompt answer reads counters; one queued behind the engine thread takes seconds


def _ignore(layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
    pass


@pytest.fixture
def served(tiny_model_dir: Path) -> Iterator[tuple[PrefillWorker, str, KVEndpoint]]:
    engine = LLMEngine(tiny_model_dir, EngineConfig(num_blocks=64, role=EngineRole.PREFILL_ONLY))
    worker = PrefillWorker(EngineLoop(engine), KVClient(), "prefill-0-g0")
    server = WorkerServer(worker)
    endpoint = open_endpoint("tcp")
    yield worker, server.start(), endpoint
    server.stop()
    worker.close()
    endpoint.close()


async def _probe(client: WorkerClient) -> tuple[float, int, int]:
    """One GetLoad as the controller sends it: (seconds it took, queued prefill tokens, waiting requests)."""
    t0 = time.monotonic()
    load = await client.load(0.0, timeout_s=PROBE_TIMEOUT_S)
    return time.monotonic() - t0, load.queued_prefill_tokens, load.waiting_requests


def test_get_load_answers_at_once_while_prefills_wait_for_the_engine_thread(
    served: tuple[PrefillWorker, str, KVEndpoint],
) -> None:
    worker, address, endpoint = served
    spec = kv_spec(worker.loop.engine)
    gate = threading.Event()
    worker.loop.submit(lambda engine: gate.wait(30.0))  # holds the engine thread as a long prefill does
    prompts = [tuple(range(1000 + 10 * i, 1000 + 10 * i + PROMPT_TOKENS)) for i in range(NUM_PROMPTS)]
    receivers = [endpoint.expect(f"q{i}", PROMPT_TOKENS, spec, _ignore) for i in range(NUM_PROMPTS)]

    async def run() -> None:
        client = WorkerClient(address)
        calls = [
            asyncio.create_task(client.prefill(f"q{i}", prompts[i], SAMPLING, rx.descriptor, timeout_s=30.0))
            for i, rx in enumerate(receivers)
        ]
        try:
            probes = [await _probe(client)]
            deadline = time.monotonic() + 10.0
            while probes[-1][2] < NUM_PROMPTS and time.monotonic() < deadline:  # the Prefill calls arrive
                await asyncio.sleep(0.02)
                probes.append(await _probe(client))
            probes += [await _probe(client) for _ in range(3)]  # the controller probes again and again
            assert max(elapsed for elapsed, _, _ in probes) < PROMPT_PROBE_S
            assert probes[-1][1:] == (NUM_PROMPTS * PROMPT_TOKENS, NUM_PROMPTS)
            gate.set()
            results = await asyncio.gather(*calls)
            assert all(r.transfer is not None and r.transfer.num_layers == spec.num_layers for r in results)
            assert (await _probe(client))[1:] == (0, 0)
        finally:
            gate.set()
            await asyncio.gather(*calls, return_exceptions=True)
            await client.close()

    asyncio.run(run())
    for rx in receivers:
        rx.wait(5.0)
    # the report's engine counters are the engine's own once its prefills have run
    assert worker.load() == worker.loop.call(lambda e: engine_load(e, "prefill-0-g0", Role.PREFILL, "node-0"))


def test_a_worker_whose_engine_loop_stopped_fails_its_load_probe(
    served: tuple[PrefillWorker, str, KVEndpoint],
) -> None:
    worker, address, _ = served
    assert worker.load().free_kv_blocks == 64
    worker.loop.stop()
    with pytest.raises(EngineStopped):  # not the last report: the probe must fail
        worker.load()

    async def probe() -> None:
        client = WorkerClient(address)
        try:
            with pytest.raises(WorkerCallError):
                await client.load(0.0, timeout_s=PROBE_TIMEOUT_S)
        finally:
            await client.close()

    asyncio.run(probe())
