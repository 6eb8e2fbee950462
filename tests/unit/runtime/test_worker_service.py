"""Prefill and decode workers over real gRPC and a real tcp KV transport, in one process (no Ray)."""

from __future__ import annotations

import asyncio
import importlib.util
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from orchestrator.core.types import Role
from orchestrator.runtime.worker_client import WorkerClient, WorkerRejected, WorkerUnavailable
from workers.engine.config import EngineConfig
from workers.engine.engine import LLMEngine
from workers.engine.sampling_params import SamplingParams
from workers.service.decode import DecodeWorker
from workers.service.host import WorkerHost, WorkerSpec
from workers.service.types import GenerateMode, StreamFinish, TokenChunk

PROMPT = tuple(range(100, 160))  # 60 tokens
GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def hosts(tiny_model_dir: Path) -> Iterator[tuple[WorkerHost, WorkerHost]]:
    prefill = WorkerHost(WorkerSpec("p0", Role.PREFILL, str(tiny_model_dir), num_kv_blocks=64))
    decode = WorkerHost(WorkerSpec("d0", Role.DECODE, str(tiny_model_dir), num_kv_blocks=64))
    yield prefill, decode
    prefill.stop()
    decode.stop()


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> tuple[int, ...]:
    engine = LLMEngine(tiny_model_dir, EngineConfig(num_blocks=64))
    return engine.generate([list(PROMPT)], GREEDY)[0].token_ids


async def _disaggregated(p: WorkerClient, d: WorkerClient, rid: str) -> tuple[list[int], StreamFinish | None]:
    res = await d.reserve(rid, PROMPT, timeout_s=10)
    first = await p.prefill(rid, PROMPT, GREEDY, res.descriptor, timeout_s=10)
    assert first.transfer is not None and first.transfer.num_layers == res.descriptor.num_layers
    tokens = [first.first_token_id]
    finish = None
    async for chunk in d.generate(rid, PROMPT, GREEDY, GenerateMode.AFTER_TRANSFER, first.first_token_id, 10):
        tokens.extend(chunk.token_ids)
        finish = chunk.finish
    return tokens, finish


def test_disaggregated_local_and_resume_give_the_engine_tokens(
    hosts: tuple[WorkerHost, WorkerHost], reference: tuple[int, ...]
) -> None:
    prefill, decode = hosts

    async def run() -> None:
        p = WorkerClient(prefill.endpoint().grpc_address)
        d = WorkerClient(decode.endpoint().grpc_address)
        tokens, finish = await _disaggregated(p, d, "r-disagg")
        assert tuple(tokens) == reference and finish is StreamFinish.LENGTH
        local = [t async for c in d.generate("r-local", PROMPT, GREEDY, GenerateMode.LOCAL_PREFILL, None, 10)
                 for t in c.token_ids]
        assert tuple(local) == reference
        resumed = [t async for c in d.resume("r-resume", PROMPT, reference[:5], GREEDY, 10) for t in c.token_ids]
        assert tuple(resumed) == reference[5:]
        # several at once share the decode batch
        results = await asyncio.gather(*(_disaggregated(p, d, f"r-many-{i}") for i in range(6)))
        assert all(tuple(t) == reference for t, _ in results)
        load = await d.load(reported_at_s=1.0)
        assert load.role is Role.DECODE and load.free_kv_blocks == load.total_kv_blocks == 64
        assert await p.health() and await d.health()
        await p.close()
        await d.close()

    asyncio.run(run())


def test_worker_errors_map_to_explicit_exceptions(hosts: tuple[WorkerHost, WorkerHost]) -> None:
    prefill, decode = hosts

    async def run() -> None:
        d = WorkerClient(decode.endpoint().grpc_address)
        with pytest.raises(WorkerRejected, match="no KV reservation"):
            async for _ in d.generate("nope", PROMPT, GREEDY, GenerateMode.AFTER_TRANSFER, 5, 5):
                pass
        with pytest.raises(WorkerRejected, match="PromptTooLong") as too_long:
            await d.reserve("huge", tuple(range(64 * 16 + 1)), timeout_s=5)
        assert too_long.value.code is grpc.StatusCode.INVALID_ARGUMENT  # as for a local prefill of it
        # a reservation whose KV never comes fails the stream instead of hanging
        await d.reserve("orphan", PROMPT, timeout_s=5)
        with pytest.raises(WorkerUnavailable):
            async for _ in d.generate("orphan", PROMPT, GREEDY, GenerateMode.AFTER_TRANSFER, 5, 5,
                                      transfer_timeout_s=0.3):
                pass
        load = await d.load(reported_at_s=0.0)
        assert load.free_kv_blocks == load.total_kv_blocks  # blocks given back
        # an abort ends a running stream with ABORT instead of leaving its reader waiting
        assert not await d.abort("never-seen")
        long = SamplingParams(max_tokens=2000, ignore_eos=True)
        chunks = []
        async for chunk in d.generate("aborted", PROMPT, long, GenerateMode.LOCAL_PREFILL, None, 30):
            chunks.append(chunk)
            if len(chunks) == 2:
                assert await d.abort("aborted")
        assert chunks[-1].finish is StreamFinish.ABORT and len(chunks) < 100
        gone = WorkerClient("127.0.0.1:1")
        with pytest.raises(WorkerUnavailable):
            await gone.load(reported_at_s=0.0, timeout_s=1)
        await d.close()
        await gone.close()

    asyncio.run(run())


def test_an_abort_while_the_kv_is_landing_ends_the_stream_and_frees_the_blocks(
    hosts: tuple[WorkerHost, WorkerHost],
) -> None:
    # the Generate call has taken the reservation and waits for the KV: the abort must still reach it
    _, decode = hosts

    async def run() -> None:
        d = WorkerClient(decode.endpoint().grpc_address)
        await d.reserve("landing", PROMPT, timeout_s=30)
        stream = asyncio.ensure_future(
            _tokens_of(d.generate("landing", PROMPT, GREEDY, GenerateMode.AFTER_TRANSFER, 5, 30, 20.0))
        )
        await asyncio.sleep(0.5)  # the call waits for KV that no prefill worker sends
        t0 = time.monotonic()
        assert await d.abort("landing")
        with pytest.raises(WorkerUnavailable):  # the transfer was cancelled: the router's abort ends it there
            await asyncio.wait_for(stream, 10)
        assert time.monotonic() - t0 < 5.0  # not the 20 s transfer timeout
        load = await d.load(reported_at_s=0.0)
        assert load.free_kv_blocks == load.total_kv_blocks
        await d.close()

    asyncio.run(run())


def test_a_reservation_gone_when_its_stream_joins_is_not_found(hosts: tuple[WorkerHost, WorkerHost]) -> None:
    # the KV landed, but the engine no longer holds the reservation (reaped as it expired) when the
    # stream joins it: NOT_FOUND, which the router answers by recomputing on a decode worker, not INTERNAL
    prefill, decode = hosts

    async def run() -> None:
        p = WorkerClient(prefill.endpoint().grpc_address)
        d = WorkerClient(decode.endpoint().grpc_address)
        res = await d.reserve("reaped", PROMPT, timeout_s=10)
        first = await p.prefill("reaped", PROMPT, GREEDY, res.descriptor, timeout_s=10)
        decode.loop.call(lambda e: e.release("reaped"))  # what the reaper does to an expired reservation
        with pytest.raises(WorkerRejected) as raised:
            async for _ in d.generate("reaped", PROMPT, GREEDY, GenerateMode.AFTER_TRANSFER, first.first_token_id, 10):
                pass
        assert raised.value.code is grpc.StatusCode.NOT_FOUND, raised.value
        load = await d.load(reported_at_s=0.0)
        assert load.free_kv_blocks == load.total_kv_blocks
        await p.close()
        await d.close()

    asyncio.run(run())


@pytest.mark.parametrize("transport", [
    "shm", "torch_dist",
    pytest.param("nixl", marks=pytest.mark.skipif(
        importlib.util.find_spec("nixl") is None, reason="optional NIXL not installed")),
])
def test_other_transports_carry_the_kv_too(tiny_model_dir: Path, reference: tuple[int, ...], transport: str) -> None:
    prefill = WorkerHost(WorkerSpec("p1", Role.PREFILL, str(tiny_model_dir), num_kv_blocks=64, transport=transport))
    decode = WorkerHost(WorkerSpec("d1", Role.DECODE, str(tiny_model_dir), num_kv_blocks=64, transport=transport))

    async def run() -> tuple[list[int], StreamFinish | None]:
        p = WorkerClient(prefill.endpoint().grpc_address)
        d = WorkerClient(decode.endpoint().grpc_address)
        try:
            return await _disaggregated(p, d, f"r-{transport}")
        finally:
            await p.close()
            await d.close()

    try:
        tokens, _ = asyncio.run(run())
    finally:
        prefill.stop()
        decode.stop()
    assert tuple(tokens) == reference


def test_a_reservation_keeps_room_for_the_output_budget_the_router_sends(
    hosts: tuple[WorkerHost, WorkerHost],
) -> None:
    _, decode = hosts

    async def run() -> None:
        d = WorkerClient(decode.endpoint().grpc_address)
        # 60 prompt tokens + 100 output tokens = 10 blocks of 16; the worker's default room is 256 tokens
        await d.reserve("room-a", PROMPT, timeout_s=10, max_tokens=100)
        await d.reserve("room-b", PROMPT, timeout_s=10)
        a, b = decode.loop.call(lambda e: (list(e.blocks.table("room-a")), list(e.blocks.table("room-b"))))
        assert a == list(range(a[0], a[0] + 4)) and b[0] == a[0] + 10
        assert await d.abort("room-a") and await d.abort("room-b")
        load = await d.load(reported_at_s=0.0)
        assert load.free_kv_blocks == load.total_kv_blocks
        await d.close()

    asyncio.run(run())


def test_a_reservation_whose_call_was_cancelled_gives_its_blocks_back(hosts: tuple[WorkerHost, WorkerHost]) -> None:
    # the router's ReserveKV call goes away while the decode worker still reserves (its engine thread is
    # busy): the reservation made afterwards must be released, not held until it expires a minute later
    import threading

    _, decode = hosts
    gate = threading.Event()

    async def run() -> None:
        d = WorkerClient(decode.endpoint().grpc_address)
        decode.worker.loop.submit(lambda engine: gate.wait(10.0))
        call = asyncio.create_task(d.reserve("r-left", PROMPT, timeout_s=60))
        await asyncio.sleep(0.3)
        call.cancel()
        await asyncio.gather(call, return_exceptions=True)
        await asyncio.sleep(0.2)  # the server sees the cancellation
        gate.set()
        for _ in range(50):  # the reservation is made, then given back
            load = await d.load(reported_at_s=1.0)
            if load.free_kv_blocks == load.total_kv_blocks and "r-left" not in decode.worker._pending:
                break
            await asyncio.sleep(0.05)
        assert load.free_kv_blocks == load.total_kv_blocks
        assert "r-left" not in decode.worker._pending
        await d.close()

    asyncio.run(run())


# --- one request id, one request at a time ------------------------------------------------------------

LONG = SamplingParams(max_tokens=200, ignore_eos=True)  # still streaming while a second call comes and goes


@pytest.fixture(scope="module")
def long_reference(tiny_model_dir: Path) -> tuple[int, ...]:
    engine = LLMEngine(tiny_model_dir, EngineConfig(num_blocks=64))
    return engine.generate([list(PROMPT)], LONG)[0].token_ids


async def _tokens_of(chunks: AsyncIterator[TokenChunk]) -> tuple[list[int], StreamFinish | None]:
    tokens: list[int] = []
    finish = None
    async for chunk in chunks:
        tokens.extend(chunk.token_ids)
        finish = chunk.finish
    return tokens, finish


async def _call_with(d: WorkerClient, call: str, rid: str) -> None:
    if call == "reserve":
        await d.reserve(rid, PROMPT, timeout_s=10)
    elif call == "resume":
        await _tokens_of(d.resume(rid, PROMPT, (1, 2), LONG, 10))
    else:
        mode = GenerateMode.AFTER_TRANSFER if call == "after_transfer" else GenerateMode.LOCAL_PREFILL
        await _tokens_of(d.generate(rid, PROMPT, LONG, mode, 5 if call == "after_transfer" else None, 10, 2))


async def _refused_as_duplicate(d: WorkerClient, call: str, rid: str) -> None:
    """``call`` with ``rid`` is refused: the id names another request on this worker."""
    with pytest.raises(WorkerRejected, match="DuplicateRequest") as refused:
        await asyncio.wait_for(_call_with(d, call, rid), 10)
    assert refused.value.code is grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize("second", ["generate_local", "after_transfer", "resume", "reserve"])
def test_a_second_call_with_a_streaming_id_is_refused_and_the_first_stream_goes_on(
    hosts: tuple[WorkerHost, WorkerHost], long_reference: tuple[int, ...], second: str
) -> None:
    _, decode = hosts

    async def run() -> None:
        d = WorkerClient(decode.endpoint().grpc_address)
        rid = f"twice-{second}"
        stream = d.generate(rid, PROMPT, LONG, GenerateMode.LOCAL_PREFILL, None, 30)
        first = await anext(stream)
        assert first.finish is None
        await _refused_as_duplicate(d, second, rid)
        # the first stream keeps its sink, its tokens and its blocks
        rest, finish = await asyncio.wait_for(_tokens_of(stream), 30)
        assert (*first.token_ids, *rest) == long_reference and finish is StreamFinish.LENGTH
        load = await d.load(reported_at_s=0.0)
        assert load.free_kv_blocks == load.total_kv_blocks
        await d.close()

    asyncio.run(run())


@pytest.mark.parametrize("second", ["generate_local", "resume"])
def test_a_stream_with_a_reserved_id_is_refused_and_the_reservation_stays(
    hosts: tuple[WorkerHost, WorkerHost], reference: tuple[int, ...], second: str
) -> None:
    prefill, decode = hosts

    async def run() -> None:
        p = WorkerClient(prefill.endpoint().grpc_address)
        d = WorkerClient(decode.endpoint().grpc_address)
        rid = f"reserved-then-{second}"
        res = await d.reserve(rid, PROMPT, timeout_s=30)
        await _refused_as_duplicate(d, second, rid)
        first = await p.prefill(rid, PROMPT, GREEDY, res.descriptor, timeout_s=10)
        rest, finish = await asyncio.wait_for(
            _tokens_of(d.generate(rid, PROMPT, GREEDY, GenerateMode.AFTER_TRANSFER, first.first_token_id, 10)), 30
        )
        assert (first.first_token_id, *rest) == reference and finish is StreamFinish.LENGTH
        await p.close()
        await d.close()

    asyncio.run(run())


def test_a_request_id_is_free_again_once_its_stream_ended(
    hosts: tuple[WorkerHost, WorkerHost], reference: tuple[int, ...]
) -> None:
    # On the worker itself (no gRPC between), so the id comes back at once: the old request's last
    # outputs (its ABORT, a token from a step already running) must not reach the new stream.
    _, decode = hosts
    worker = decode.worker
    assert isinstance(worker, DecodeWorker)

    async def cancelled(rid: str) -> None:  # the caller leaves, as gRPC cancels the handler's task
        started = asyncio.Event()

        async def read() -> None:
            async for _ in worker.generate_local(rid, PROMPT, LONG):
                started.set()

        task = asyncio.create_task(read())
        await started.wait()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def closed(rid: str) -> None:  # the consumer closes the stream
        stream = worker.generate_local(rid, PROMPT, LONG)
        assert isinstance(stream, AsyncGenerator)
        await anext(stream)
        await stream.aclose()

    async def left_in_line(rid: str) -> None:  # the caller leaves before its request reached the engine
        gate = threading.Event()
        decode.loop.submit(lambda engine: gate.wait(10.0))
        task = asyncio.create_task(_tokens_of(worker.generate_local(rid, PROMPT, LONG)))
        await asyncio.sleep(0.1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        gate.set()

    async def aborted(rid: str) -> None:
        stream = worker.generate_local(rid, PROMPT, LONG)
        await anext(stream)
        assert worker.abort(rid)
        _, finish = await _tokens_of(stream)
        assert finish is StreamFinish.ABORT

    async def finished(rid: str) -> None:
        await _tokens_of(worker.generate_local(rid, PROMPT, GREEDY))

    async def run() -> None:
        # the caller-left cases race the engine thread: repeated, so a stray output shows up at least once
        ends = [cancelled, closed] * 12 + [left_in_line, aborted, finished]
        for i, end in enumerate(ends):
            rid = f"again-{end.__name__}-{i}"
            await end(rid)
            if end is left_in_line:  # its stream never started: nothing of it stays behind
                decode.loop.call(lambda engine: None)
                assert rid not in decode.loop._sinks and rid not in worker._calls
            tokens, finish = await asyncio.wait_for(_tokens_of(worker.generate_local(rid, PROMPT, GREEDY)), 30)
            assert (tuple(tokens), finish) == (reference, StreamFinish.LENGTH), end.__name__

    asyncio.run(run())
    assert decode.loop.call(lambda e: (e.has_unfinished(), e.free_blocks == e.total_blocks)) == (False, True)
    assert not decode.loop._sinks


def test_a_second_prefill_with_the_same_id_is_refused(
    hosts: tuple[WorkerHost, WorkerHost], reference: tuple[int, ...]
) -> None:
    prefill, decode = hosts
    gate = threading.Event()

    async def run() -> None:
        p = WorkerClient(prefill.endpoint().grpc_address)
        d = WorkerClient(decode.endpoint().grpc_address)
        res = await d.reserve("p-twice", PROMPT, timeout_s=30)
        prefill.worker.loop.submit(lambda engine: gate.wait(10.0))  # the first prefill waits in line
        try:
            first = asyncio.create_task(p.prefill("p-twice", PROMPT, GREEDY, res.descriptor, timeout_s=20))
            await asyncio.sleep(0.2)
            with pytest.raises(WorkerRejected, match="DuplicateRequest") as refused:
                await asyncio.wait_for(p.prefill("p-twice", PROMPT, GREEDY, res.descriptor, timeout_s=5), 3)
            assert refused.value.code is grpc.StatusCode.FAILED_PRECONDITION
        finally:
            gate.set()
        result = await first
        rest, _ = await _tokens_of(
            d.generate("p-twice", PROMPT, GREEDY, GenerateMode.AFTER_TRANSFER, result.first_token_id, 10)
        )
        assert (result.first_token_id, *rest) == reference
        await p.close()
        await d.close()

    asyncio.run(run())
