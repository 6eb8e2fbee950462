"""Worker services when the engine dies or the input is bad: the status codes the router acts on.

Real engines, real gRPC, real tcp KV, in one process (no Ray). A dead engine is a step that raises,
as a device fault does: the worker answers UNAVAILABLE, so the router hands the request to another
worker; input no worker can serve is INVALID_ARGUMENT and holds no KV blocks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, Awaitable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from orchestrator.core.types import ClusterSnapshot, InstanceLoad, Role
from orchestrator.runtime.backend import GenerationRequest
from orchestrator.runtime.controller import ClusterView
from orchestrator.runtime.disagg_backend import DisaggregatedBackend, StaticViews
from orchestrator.runtime.worker_client import WorkerClient, WorkerRejected, WorkerUnavailable
from protos.pdserve.v1 import worker_pb2 as pb
from protos.pdserve.v1 import worker_pb2_grpc as pb_grpc
from workers.engine.config import EngineConfig
from workers.engine.engine import LLMEngine
from workers.engine.loader import load_tokenizer
from workers.engine.sampling_params import SamplingParams
from workers.service.decode import DecodeWorker
from workers.service.host import WorkerHost, WorkerSpec
from workers.service.types import GenerateMode

BLOCKS = 64
PROMPT = tuple(range(300, 380))  # 80 tokens: the router sends it through a prefill worker
SAMPLING = SamplingParams(max_tokens=40, ignore_eos=True)
BAD_SAMPLING = pb.SamplingParams(max_tokens=0, temperature=0.0, top_p=1.0)  # max_tokens must be >= 1


@contextmanager
def _hosts(model_dir: Path, *ids: str) -> Iterator[dict[str, WorkerHost]]:
    """Fresh workers (their engines get broken here), stopped at the end; an id names its role."""
    hosts: dict[str, WorkerHost] = {}
    try:
        for iid in ids:
            role = Role.PREFILL if iid.startswith("prefill") else Role.DECODE
            hosts[iid] = WorkerHost(WorkerSpec(iid, role, str(model_dir), num_kv_blocks=BLOCKS))
        yield hosts
    finally:
        for host in hosts.values():
            host.stop()


def _crash_after(host: WorkerHost, num_steps: int) -> None:
    """Make the engine's step raise, as a device fault would, after ``num_steps`` more steps."""
    engine = host.loop.engine
    step = engine.step
    left = [num_steps]

    def failing_step() -> object:
        left[0] -= 1
        if left[0] < 0:
            raise RuntimeError("injected device fault")
        return step()

    engine.step = failing_step


def _view(hosts: dict[str, WorkerHost], ids: list[str]) -> ClusterView:
    """Equal loads: the router takes the first instance of each role in ``ids``."""
    insts = tuple(
        InstanceLoad(i, hosts[i].endpoint().role, free_kv_blocks=BLOCKS, total_kv_blocks=BLOCKS) for i in ids
    )
    return ClusterView(ClusterSnapshot(at_s=0.0, instances=insts, version=1), tuple(hosts[i].endpoint() for i in ids))


async def _finish(call: Awaitable[object] | AsyncIterable[object]) -> None:
    """Await a unary call, or read a stream to its end."""
    if isinstance(call, AsyncIterable):
        async for _ in call:
            pass
    else:
        await call


async def _unavailable(call: Awaitable[object] | AsyncIterable[object]) -> None:
    with pytest.raises(WorkerUnavailable) as raised:
        await _finish(call)
    assert raised.value.code is grpc.StatusCode.UNAVAILABLE, raised.value


def test_a_decode_worker_whose_engine_crashed_answers_unavailable(tiny_model_dir: Path) -> None:
    with _hosts(tiny_model_dir, "decode-0") as hosts:
        decode = hosts["decode-0"]

        async def run() -> None:
            d = WorkerClient(decode.endpoint().grpc_address)
            try:
                stream = d.generate("open", PROMPT, SAMPLING, GenerateMode.LOCAL_PREFILL, None, 30)
                assert (await anext(stream)).finish is None
                _crash_after(decode, 0)
                await _unavailable(stream)  # the open stream ends
                assert not decode.ping()
                await _unavailable(d.reserve("later-reserve", PROMPT, timeout_s=10))
                await _unavailable(d.generate("later-local", PROMPT, SAMPLING, GenerateMode.LOCAL_PREFILL, None, 10))
                await _unavailable(d.resume("later-resume", PROMPT, (1, 2), SAMPLING, 10))
            finally:
                await d.close()

        asyncio.run(run())


def test_a_prefill_worker_whose_engine_stopped_answers_unavailable(tiny_model_dir: Path) -> None:
    with _hosts(tiny_model_dir, "prefill-0", "decode-0") as hosts:
        hosts["prefill-0"].loop.stop()

        async def run() -> None:
            p = WorkerClient(hosts["prefill-0"].endpoint().grpc_address)
            d = WorkerClient(hosts["decode-0"].endpoint().grpc_address)
            try:
                res = await d.reserve("p-dead", PROMPT, timeout_s=10)
                await _unavailable(p.prefill("p-dead", PROMPT, SAMPLING, res.descriptor, timeout_s=10))
                assert await d.abort("p-dead")
            finally:
                await p.close()
                await d.close()

        asyncio.run(run())


def test_the_router_hands_requests_of_a_dead_engine_to_another_worker(tiny_model_dir: Path) -> None:
    reference = LLMEngine(tiny_model_dir, EngineConfig(num_blocks=BLOCKS)).generate([list(PROMPT)], SAMPLING)[0]
    with _hosts(tiny_model_dir, "prefill-0", "prefill-1", "decode-0", "decode-1") as hosts:

        async def generate(ids: list[str], rid: str) -> tuple[tuple[int, ...], int]:
            view = _view(hosts, ids)
            backend = DisaggregatedBackend(StaticViews(view), load_tokenizer(str(tiny_model_dir)), initial_view=view)
            now = time.time()
            tokens: list[int] = []
            try:
                request = GenerationRequest(rid, PROMPT, SAMPLING, arrival_s=now, deadline_s=now + 60)
                async for event in backend.generate(request):
                    tokens.extend(event.token_ids)
            finally:
                await backend.close()
            return tuple(tokens), backend.handovers

        _crash_after(hosts["decode-0"], 5)  # decode-0 dies mid-stream: decode-1 resumes the request
        assert asyncio.run(generate(["prefill-0", "decode-0", "decode-1"], "d-crash")) == (reference.token_ids, 1)
        hosts["prefill-0"].loop.stop()  # prefill-0 serves nothing more: prefill-1 prefills instead
        assert asyncio.run(generate(["prefill-0", "prefill-1", "decode-1"], "p-stopped")) == (reference.token_ids, 1)


async def _code_of(call: Awaitable[object] | AsyncIterable[object]) -> grpc.StatusCode:
    """The status a raw gRPC call ends with; it must fail."""
    try:
        await _finish(call)
    except grpc.RpcError as exc:
        return exc.code()
    raise AssertionError("the call succeeded")


def _holds_nothing(host: WorkerHost) -> bool:
    """No reservation left on the decode worker nor in its engine, every block free."""
    assert isinstance(host.worker, DecodeWorker)
    free, reserved = host.loop.call(lambda e: (e.free_blocks, dict(e._reserved)))
    return free == BLOCKS and not reserved and not host.worker._pending


def test_input_no_worker_can_serve_is_invalid_and_holds_no_blocks(tiny_model_dir: Path) -> None:
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    with _hosts(tiny_model_dir, "decode-0") as hosts:
        decode = hosts["decode-0"]

        async def run() -> None:
            channel = grpc.aio.insecure_channel(decode.endpoint().grpc_address)
            stub = pb_grpc.DecodeStub(channel)
            try:
                local = pb.GenerateRequest(request_id="bad-local", prompt_token_ids=PROMPT, sampling=BAD_SAMPLING,
                                           mode=pb.GENERATE_MODE_LOCAL_PREFILL)
                assert await _code_of(stub.Generate(local, timeout=10)) is invalid
                resume = pb.ResumeRequest(request_id="bad-resume", prompt_token_ids=PROMPT, generated_token_ids=[1],
                                          sampling=BAD_SAMPLING)
                assert await _code_of(stub.Resume(resume, timeout=10)) is invalid
                # a Generate that cannot start gives its reservation back at once, not when it expires
                reserve = pb.ReserveKVRequest(request_id="bad-after", prompt_token_ids=PROMPT, timeout_s=60)
                await stub.ReserveKV(reserve, timeout=10)
                after = pb.GenerateRequest(request_id="bad-after", prompt_token_ids=PROMPT, sampling=BAD_SAMPLING,
                                           mode=pb.GENERATE_MODE_AFTER_TRANSFER, first_token_id=5)
                assert await _code_of(stub.Generate(after, timeout=10)) is invalid
                # a prompt a reservation cannot hold: as invalid as for a local prefill
                for rid, prompt in (("empty", ()), ("too-long", tuple(range(BLOCKS * 16 + 1)))):
                    reserve = pb.ReserveKVRequest(request_id=rid, prompt_token_ids=prompt, timeout_s=10)
                    assert await _code_of(stub.ReserveKV(reserve, timeout=10)) is invalid, rid
            finally:
                await channel.close()

        asyncio.run(run())
        assert _holds_nothing(decode)


def test_a_reservation_that_would_never_expire_is_refused(tiny_model_dir: Path) -> None:
    with _hosts(tiny_model_dir, "decode-0") as hosts:
        decode = hosts["decode-0"]

        async def run() -> None:
            channel = grpc.aio.insecure_channel(decode.endpoint().grpc_address)
            stub = pb_grpc.DecodeStub(channel)
            try:
                for rid, timeout_s in (("nan", float("nan")), ("inf", float("inf")), ("negative", -1.0)):
                    reserve = pb.ReserveKVRequest(request_id=rid, prompt_token_ids=PROMPT, timeout_s=timeout_s)
                    assert await _code_of(stub.ReserveKV(reserve, timeout=10)) is grpc.StatusCode.INVALID_ARGUMENT
            finally:
                await channel.close()

        asyncio.run(run())
        assert _holds_nothing(decode)


def test_an_empty_prompt_to_a_prefill_worker_is_invalid(tiny_model_dir: Path) -> None:
    with _hosts(tiny_model_dir, "prefill-0", "decode-0") as hosts:

        async def run() -> None:
            p = WorkerClient(hosts["prefill-0"].endpoint().grpc_address)
            d = WorkerClient(hosts["decode-0"].endpoint().grpc_address)
            try:
                res = await d.reserve("empty-prefill", PROMPT, timeout_s=10)
                with pytest.raises(WorkerRejected) as raised:
                    await p.prefill("empty-prefill", (), SAMPLING, res.descriptor, timeout_s=10)
                assert raised.value.code is grpc.StatusCode.INVALID_ARGUMENT, raised.value
                assert await d.abort("empty-prefill")
            finally:
                await p.close()
                await d.close()

        asyncio.run(run())
