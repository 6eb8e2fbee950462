"""The prefill worker when its caller goes away (a client disconnect): nothing stays counted or connected.

Real engine (tiny model), real engine loop, real torch_dist pair and receiver in this process.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from workers.engine.config import EngineConfig, EngineRole
from workers.engine.engine import LLMEngine
from workers.engine.outputs import DuplicateRequest
from workers.engine.sampling_params import SamplingParams
from workers.kv.descriptor import TransferDescriptor
from workers.kv.errors import KVTransferError
from workers.kv.interface import EndpointOptions, KVEndpoint, SenderOptions
from workers.kv.registry import KVClient, open_endpoint
from workers.service.decode import kv_spec
from workers.service.engine_loop import EngineLoop
from workers.service.prefill import PrefillWorker

PROMPT = tuple(range(300, 364))
SAMPLING = SamplingParams(max_tokens=1)


def _ignore(layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
    pass


async def _abandon(worker: PrefillWorker, request_id: str, descriptor: TransferDescriptor) -> None:
    """Start a prefill of PROMPT, then leave it as a disconnecting client's handler does (cancelled)."""
    task = asyncio.create_task(worker.prefill(request_id, PROMPT, SAMPLING, descriptor))
    await asyncio.sleep(0.3)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


@pytest.fixture
def parts(tiny_model_dir: Path) -> Iterator[tuple[PrefillWorker, KVEndpoint, KVClient]]:
    engine = LLMEngine(tiny_model_dir, EngineConfig(num_blocks=64, role=EngineRole.PREFILL_ONLY))
    client = KVClient(SenderOptions(timeout_s=5.0))
    worker = PrefillWorker(EngineLoop(engine), client, "prefill-0-g0")
    endpoint = open_endpoint("torch_dist", EndpointOptions(stall_timeout_s=10.0))
    yield worker, endpoint, client
    worker.close()
    endpoint.close()


def test_a_prefill_abandoned_while_queued_is_no_longer_counted(
    parts: tuple[PrefillWorker, KVEndpoint, KVClient],
) -> None:
    worker, endpoint, _ = parts
    gate = threading.Event()
    worker.loop.submit(lambda engine: gate.wait(10.0))  # the engine thread is busy: the prefill waits in line
    rx = endpoint.expect("left-in-line", len(PROMPT), kv_spec(worker.loop.engine), _ignore)

    asyncio.run(_abandon(worker, "left-in-line", rx.descriptor))
    gate.set()
    worker.loop.call(lambda engine: None)  # the engine thread has run (or skipped) the abandoned job
    assert worker.load().queued_prefill_tokens == 0
    rx.cancel()


def test_a_prefill_abandoned_while_running_aborts_its_sender(parts: tuple[PrefillWorker, KVEndpoint, KVClient]) -> None:
    # the prefill's sender waits for the pair another transfer holds, so the job is running when its caller
    # leaves; once it gets the pair and prefills, its sender must be aborted, else it keeps the pair forever
    worker, endpoint, client = parts
    spec = kv_spec(worker.loop.engine)
    holder = client.open(endpoint.expect("holder", len(PROMPT), spec, _ignore).descriptor)
    rx = endpoint.expect("left-running", len(PROMPT), spec, _ignore)

    asyncio.run(_abandon(worker, "left-running", rx.descriptor))
    holder.abort()  # the pair is free: the abandoned prefill runs now
    t0 = time.monotonic()
    with pytest.raises(KVTransferError):
        rx.wait(8.0)
    assert time.monotonic() - t0 < 4.0  # aborted, not left to the receiver's stall deadline
    after = endpoint.expect("after", len(PROMPT), spec, _ignore)
    result = asyncio.run(worker.prefill("after", PROMPT, SAMPLING, after.descriptor))  # the pair is free again
    assert result.transfer is not None and result.transfer.num_layers == spec.num_layers
    after.wait(5.0)


def test_a_second_prefill_with_the_same_id_is_refused_and_the_first_runs(
    parts: tuple[PrefillWorker, KVEndpoint, KVClient],
) -> None:
    # the second caller is refused and leaves; that must not abort the first prefill, still in line
    worker, endpoint, _ = parts
    gate = threading.Event()
    worker.loop.submit(lambda engine: gate.wait(10.0))
    rx = endpoint.expect("twice", len(PROMPT), kv_spec(worker.loop.engine), _ignore)

    async def run() -> None:
        first = asyncio.create_task(worker.prefill("twice", PROMPT, SAMPLING, rx.descriptor))
        await asyncio.sleep(0.1)
        second = asyncio.create_task(worker.prefill("twice", PROMPT, SAMPLING, rx.descriptor))
        await asyncio.sleep(0.1)
        second.cancel()
        (refused,) = await asyncio.gather(second, return_exceptions=True)
        assert isinstance(refused, DuplicateRequest)
        gate.set()
        result = await asyncio.wait_for(first, 10)
        assert result.transfer is not None
        assert worker.abort("twice") is False  # done: nothing left to skip
        again = endpoint.expect("twice-again", len(PROMPT), kv_spec(worker.loop.engine), _ignore)
        await worker.prefill("twice", PROMPT, SAMPLING, again.descriptor)  # the id is free again
        again.wait(5.0)

    try:
        asyncio.run(run())
    finally:
        gate.set()
    rx.wait(5.0)
    assert worker.load().queued_prefill_tokens == 0
