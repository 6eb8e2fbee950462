"""The disaggregated backend over in-process workers (real engines, real gRPC, real tcp KV; no Ray)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.core.admission import AdmissionConfig
from orchestrator.core.types import ClusterSnapshot, InstanceLoad, Role
from orchestrator.runtime.backend import (
    DeadlineExceeded,
    FinishReason,
    GenerationFailed,
    GenerationRequest,
    InvalidRequest,
    RequestRejected,
    TokenEvent,
)
from orchestrator.runtime.controller import ClusterView
from orchestrator.runtime.disagg_backend import (
    DisaggregatedBackend,
    RouterConfig,
    StaticViews,
)
from orchestrator.runtime.metrics import ServingMetrics
from orchestrator.runtime.worker_client import WorkerClient
from workers.engine.config import EngineConfig, EngineRole
from workers.engine.engine import LLMEngine
from workers.engine.loader import load_tokenizer
from workers.engine.sampling_params import SamplingParams
from workers.kv.descriptor import TransferDescriptor
from workers.kv.interface import FaultInjection, SenderOptions
from workers.kv.registry import KVClient
from workers.service.engine_loop import EngineLoop
from workers.service.host import WorkerHost, WorkerSpec
from workers.service.prefill import PrefillWorker
from workers.service.server import WorkerServer
from workers.service.types import PrefillResult, Reservation, WorkerEndpoint

BLOCKS = 64
PROMPT = tuple(range(300, 380))  # 80 tokens: disaggregated (above the short-prompt limit)


@dataclass
class Cluster:
    hosts: dict[str, WorkerHost | tuple[PrefillWorker, WorkerServer]]
    endpoints: dict[str, WorkerEndpoint]

    def view(self, ids: list[str], version: int = 1) -> ClusterView:
        insts = tuple(
            InstanceLoad(iid, self.endpoints[iid].role, free_kv_blocks=BLOCKS, total_kv_blocks=BLOCKS) for iid in ids
        )
        return ClusterView(ClusterSnapshot(at_s=0.0, instances=insts, version=version),
                           tuple(self.endpoints[i] for i in ids))


def _bad_prefill(model_dir: Path, instance_id: str) -> tuple[PrefillWorker, WorkerServer]:
    """A prefill worker whose sender corrupts layer 1 after checksumming it."""
    engine = LLMEngine(model_dir, EngineConfig(num_blocks=BLOCKS, role=EngineRole.PREFILL_ONLY))
    client = KVClient(SenderOptions(fault=FaultInjection(corrupt_layer_idx=1)))
    worker = PrefillWorker(EngineLoop(engine), client, instance_id)
    server = WorkerServer(worker)
    server.start()
    return worker, server


@pytest.fixture(scope="module")
def cluster(tiny_model_dir: Path) -> Iterator[Cluster]:
    hosts: dict[str, WorkerHost | tuple[PrefillWorker, WorkerServer]] = {}
    endpoints: dict[str, WorkerEndpoint] = {}
    for iid, role in (("prefill-0-g0", Role.PREFILL), ("decode-0-g0", Role.DECODE), ("decode-1-g0", Role.DECODE)):
        host = WorkerHost(WorkerSpec(iid, role, str(tiny_model_dir), num_kv_blocks=BLOCKS))
        hosts[iid], endpoints[iid] = host, host.endpoint()
    bad = _bad_prefill(tiny_model_dir, "prefill-9-g0")
    hosts["prefill-9-g0"] = bad
    endpoints["prefill-9-g0"] = WorkerEndpoint("prefill-9-g0", Role.PREFILL, "node-0", bad[1].address)
    yield Cluster(hosts, endpoints)
    for h in hosts.values():
        if isinstance(h, WorkerHost):
            h.stop()
        else:
            h[1].stop()
            h[0].close()


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> LLMEngine:
    return LLMEngine(tiny_model_dir, EngineConfig(num_blocks=BLOCKS))


def _request(rid: str, prompt: tuple[int, ...] = PROMPT, deadline_in_s: float = 60.0, **sampling: object) -> GenerationRequest:
    now = time.time()
    params = SamplingParams(**{"max_tokens": 12, "ignore_eos": True, **sampling})  # type: ignore[arg-type]
    return GenerationRequest(rid, prompt, params, arrival_s=now, deadline_s=now + deadline_in_s)


def _run(backend: DisaggregatedBackend, *requests: GenerationRequest) -> list[list[TokenEvent]]:
    async def one(req: GenerationRequest) -> list[TokenEvent]:
        return [event async for event in backend.generate(req)]

    async def all_of() -> list[list[TokenEvent]]:
        try:
            return list(await asyncio.gather(*(one(r) for r in requests)))
        finally:
            await backend.close()

    return asyncio.run(all_of())


def _tokens(events: list[TokenEvent]) -> tuple[int, ...]:
    return tuple(t for e in events for t in e.token_ids)


def test_disaggregated_and_local_paths_give_the_engine_tokens_and_text(
    cluster: Cluster, reference: LLMEngine, tiny_model_dir: Path
) -> None:
    views = StaticViews(cluster.view(["prefill-0-g0", "decode-0-g0", "decode-1-g0"]))
    backend = DisaggregatedBackend(views, load_tokenizer(tiny_model_dir), initial_view=views.view)
    short = tuple(range(40, 50))
    out = _run(backend, _request("a"), _request("b"), _request("short", short))
    for events, prompt in zip(out, (PROMPT, PROMPT, short), strict=True):
        want = reference.generate([list(prompt)], SamplingParams(max_tokens=12, ignore_eos=True))[0]
        assert _tokens(events) == want.token_ids
        assert "".join(e.text for e in events) == want.text
        assert events[-1].finish_reason is FinishReason.LENGTH and events[-1].completion_tokens == 12
    assert backend.handovers == 0


def test_corrupted_transfer_and_dead_prefill_are_retried_on_a_healthy_prefill(
    cluster: Cluster, reference: LLMEngine, tiny_model_dir: Path
) -> None:
    gone = WorkerEndpoint("prefill-8-g0", Role.PREFILL, "node-0", "127.0.0.1:1")  # nothing listens there
    cluster.endpoints["prefill-8-g0"] = gone
    # The two broken prefill workers sort first (no queued work, snapshot order).
    views = StaticViews(cluster.view(["prefill-9-g0", "prefill-8-g0", "prefill-0-g0", "decode-0-g0"]))
    backend = DisaggregatedBackend(views, load_tokenizer(tiny_model_dir), initial_view=views.view)
    (events,) = _run(backend, _request("retry"))
    want = reference.generate([list(PROMPT)], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert _tokens(events) == want.token_ids
    assert backend.handovers == 2  # checksum error on prefill-9, connection refused on prefill-8
    # prefill-9 said its own bytes went bad (a checksum error): it is avoided, not the healthy decode worker
    assert set(backend._suspects) == {"prefill-9-g0", "prefill-8-g0"}


def test_stop_string_deadline_and_explicit_errors(cluster: Cluster, tiny_model_dir: Path, reference: LLMEngine) -> None:
    views = StaticViews(cluster.view(["prefill-0-g0", "decode-0-g0"]))
    decoder = load_tokenizer(tiny_model_dir)
    want = reference.generate([list(PROMPT)], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    stop = want.text[len(want.text) // 2 : len(want.text) // 2 + 3]
    backend = DisaggregatedBackend(views, decoder, initial_view=views.view)
    (events,) = _run(backend, _request("stop", stop=(stop,)))
    text = "".join(e.text for e in events)
    assert events[-1].finish_reason is FinishReason.STOP and stop not in text and want.text.startswith(text)

    backend = DisaggregatedBackend(views, decoder, initial_view=views.view)
    with pytest.raises(DeadlineExceeded):
        _run(backend, _request("late", deadline_in_s=-1.0))
    backend = DisaggregatedBackend(views, decoder, RouterConfig(), initial_view=views.view)
    with pytest.raises(RequestRejected, match="prompt_too_long"):
        _run(backend, _request("long", tuple(range(3000))))
    only_prefill = StaticViews(cluster.view(["prefill-0-g0"]))
    backend = DisaggregatedBackend(only_prefill, decoder, initial_view=only_prefill.view)
    with pytest.raises(GenerationFailed, match="no healthy decode"):
        _run(backend, _request("nowhere"))


def test_a_new_request_still_tries_a_worker_that_failed_a_call_recently(
    cluster: Cluster, tiny_model_dir: Path, reference: LLMEngine
) -> None:
    views = StaticViews(cluster.view(["prefill-0-g0", "decode-0-g0"]))
    backend = DisaggregatedBackend(views, load_tokenizer(tiny_model_dir), initial_view=views.view)
    backend._suspect("decode-0-g0")  # as after a transient gRPC failure
    (events,) = _run(backend, _request("after-blip"))
    want = reference.generate([list(PROMPT)], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert _tokens(events) == want.token_ids


@pytest.mark.parametrize("prompt", [PROMPT + (32000,), (5, 32000)])  # disaggregated, and short (decode prefills)
def test_a_token_id_outside_the_vocabulary_is_invalid_not_a_failure(
    cluster: Cluster, tiny_model_dir: Path, prompt: tuple[int, ...]
) -> None:
    views = StaticViews(cluster.view(["prefill-0-g0", "decode-0-g0"]))
    backend = DisaggregatedBackend(views, load_tokenizer(tiny_model_dir), initial_view=views.view)
    with pytest.raises(InvalidRequest, match="32000"):
        _run(backend, _request("oov", prompt))
    assert backend.handovers == 0  # bad input is not retried on other workers


class _DiesAfterReserve(WorkerClient):
    """A decode worker's client whose worker stops right after granting a reservation, as if it crashed."""

    def __init__(self, address: str, host: WorkerHost) -> None:
        super().__init__(address)
        self.host = host
        self.stopped = False

    async def reserve(
        self, request_id: str, prompt: tuple[int, ...], timeout_s: float, max_tokens: int = 0
    ) -> Reservation:
        res = await super().reserve(request_id, prompt, timeout_s, max_tokens)
        await asyncio.to_thread(self.host.stop)
        self.stopped = True
        return res


def test_a_transfer_to_a_dead_decode_worker_suspects_that_worker_not_the_prefill_worker(
    cluster: Cluster, reference: LLMEngine, tiny_model_dir: Path
) -> None:
    dying = WorkerHost(WorkerSpec("decode-2-g0", Role.DECODE, str(tiny_model_dir), num_kv_blocks=BLOCKS))
    cluster.endpoints["decode-2-g0"] = dying.endpoint()
    # The dying decode worker sorts first, so the first request reserves there.
    views = StaticViews(cluster.view(["prefill-0-g0", "decode-2-g0", "decode-0-g0"]))
    backend = DisaggregatedBackend(views, load_tokenizer(tiny_model_dir), initial_view=views.view)
    clients: list[_DiesAfterReserve] = []

    async def scenario() -> tuple[list[TokenEvent], dict[str, float], frozenset[str]]:
        clients.append(_DiesAfterReserve(dying.endpoint().grpc_address, dying))  # a channel of this loop
        backend._clients[dying.endpoint().grpc_address] = clients[0]
        try:
            first = [e async for e in backend.generate(_request("decode-dies"))]
            suspects = dict(backend._suspects)
            used: frozenset[str] = frozenset()
            async for _ in backend.generate(_request("next-long-prompt")):
                used = used or backend.instances_of("next-long-prompt")
            return first, suspects, used
        finally:
            await backend.close()

    try:
        first, suspects, used = asyncio.run(scenario())
    finally:
        if not (clients and clients[0].stopped):
            dying.stop()
        del cluster.endpoints["decode-2-g0"]
    want = reference.generate([list(PROMPT)], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert _tokens(first) == want.token_ids
    assert set(suspects) == {"decode-2-g0"}  # the healthy prefill worker stays routable
    assert backend.handovers == 1  # the retry reserved on decode-0, not on the dead decode-2
    assert used == {"prefill-0-g0", "decode-0-g0"}  # the next long prompt is prefilled on P again


def _gauges(metrics: ServingMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the real registry's exposition, keyed by name and sorted labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for s in family.samples
    }


def _bare_view(version: int, *insts: InstanceLoad) -> ClusterView:
    endpoints = tuple(WorkerEndpoint(i.instance_id, i.role, "node-0", "127.0.0.1:1") for i in insts)
    return ClusterView(ClusterSnapshot(at_s=0.0, instances=insts, version=version), endpoints)


def test_instances_that_leave_the_view_or_flip_role_leave_the_metrics() -> None:
    metrics = ServingMetrics()
    p0 = InstanceLoad("prefill-0-g0", Role.PREFILL, waiting_requests=2, free_kv_blocks=10, total_kv_blocks=64)
    d0 = InstanceLoad("decode-0-g0", Role.DECODE, running_requests=3, free_kv_blocks=4, total_kv_blocks=64)
    views = StaticViews(_bare_view(1, p0, d0))
    backend = DisaggregatedBackend(views, None, metrics=metrics)
    assert asyncio.run(backend.refresh())
    used_d0 = ("pdserve_kv_blocks_used", (("instance", "decode-0-g0"), ("role", "decode")))
    assert _gauges(metrics)[used_d0] == 60

    # decode-0 died; prefill-0 became a decode worker.
    views.publish(_bare_view(2, InstanceLoad("prefill-0-g0", Role.DECODE, free_kv_blocks=64, total_kv_blocks=64)))
    assert asyncio.run(backend.refresh())
    labels = {labels for (name, labels) in _gauges(metrics) if name != "pdserve_pool_size"}
    instances = {dict(lb).get("instance") for lb in labels} - {None}
    assert instances == {"prefill-0-g0"}
    assert not any(dict(lb).get("role") == "prefill" or dict(lb).get("queue") == "prefill" for lb in labels)
    assert _gauges(metrics)[("pdserve_kv_blocks_free", (("instance", "prefill-0-g0"), ("role", "decode")))] == 64


def test_the_router_queue_gauge_drops_when_a_queued_request_leaves() -> None:
    metrics = ServingMetrics()
    full = InstanceLoad("prefill-0-g0", Role.PREFILL, waiting_requests=1, free_kv_blocks=64, total_kv_blocks=64)
    views = StaticViews(_bare_view(1, full, InstanceLoad("decode-0-g0", Role.DECODE, free_kv_blocks=64,
                                                         total_kv_blocks=64)))
    config = RouterConfig(admission=AdmissionConfig(max_waiting_requests=1))
    backend = DisaggregatedBackend(views, None, config, initial_view=views.view, metrics=metrics)
    router = ("pdserve_queue_depth", (("instance", "router"), ("queue", "router")))
    seen: list[float] = []

    async def watch() -> None:
        while not seen or seen[-1] == 0:
            seen.append(_gauges(metrics).get(router, 0.0))
            await asyncio.sleep(0.01)

    async def scenario() -> None:
        watcher = asyncio.create_task(watch())
        try:
            with pytest.raises(DeadlineExceeded, match="waited at the router"):
                _ = [e async for e in backend.generate(_request("waits", deadline_in_s=0.3))]
        finally:
            watcher.cancel()
            await backend.close()

    asyncio.run(scenario())
    assert seen[-1] == 1  # it did wait in the router's queue
    assert _gauges(metrics)[router] == 0  # and the gauge says so once it left


class _SlowPrefill(PrefillWorker):
    """A prefill worker that starts each prefill only after ``delay_s`` (a long queue ahead of it)."""

    delay_s = 0.5

    async def prefill(self, request_id: str, prompt_token_ids: tuple[int, ...], sampling: SamplingParams,
                      descriptor: TransferDescriptor) -> PrefillResult:
        await asyncio.sleep(self.delay_s)
        return await super().prefill(request_id, prompt_token_ids, sampling, descriptor)


def test_an_aborted_request_ends_as_an_abort_and_is_not_handed_over(cluster: Cluster, tiny_model_dir: Path) -> None:
    engine = LLMEngine(tiny_model_dir, EngineConfig(num_blocks=BLOCKS, role=EngineRole.PREFILL_ONLY))
    slow = _SlowPrefill(EngineLoop(engine), KVClient(), "prefill-7-g0")
    server = WorkerServer(slow)
    cluster.endpoints["prefill-7-g0"] = WorkerEndpoint("prefill-7-g0", Role.PREFILL, "node-0", server.start())
    # The slow prefill worker sorts first; prefill-0 is where a hand-over would go.
    views = StaticViews(cluster.view(["prefill-7-g0", "prefill-0-g0", "decode-0-g0"]))
    backend = DisaggregatedBackend(views, load_tokenizer(tiny_model_dir), initial_view=views.view)

    async def scenario() -> list[TokenEvent]:
        async def consume() -> list[TokenEvent]:
            return [e async for e in backend.generate(_request("client-left"))]

        task = asyncio.create_task(consume())
        while "prefill-7-g0" not in backend.instances_of("client-left"):
            await asyncio.sleep(0.01)
        await backend.abort("client-left")  # while P waits: D's reservation is dropped under the prefill
        try:
            return await asyncio.wait_for(task, 30)
        finally:
            await backend.close()

    try:
        events = asyncio.run(scenario())
    finally:
        server.stop()
        slow.close()
        del cluster.endpoints["prefill-7-g0"]
    assert events[-1].finish_reason is FinishReason.ABORT
    assert _tokens(events) == ()
    assert backend.handovers == 0  # not re-prefilled on prefill-0


def test_an_abort_while_the_reservation_is_made_ends_the_request(cluster: Cluster, tiny_model_dir: Path) -> None:
    host = cluster.hosts["decode-0-g0"]
    assert isinstance(host, WorkerHost)
    views = StaticViews(cluster.view(["prefill-0-g0", "decode-0-g0"]))
    backend = DisaggregatedBackend(views, load_tokenizer(tiny_model_dir), initial_view=views.view)
    gate = threading.Event()

    async def scenario() -> list[TokenEvent]:
        async def consume() -> list[TokenEvent]:
            return [e async for e in backend.generate(_request("abort-in-reserve"))]

        host.loop.submit(lambda engine: gate.wait(10))  # D's engine thread is busy: ReserveKV waits for it
        task = asyncio.create_task(consume())
        while "decode-0-g0" not in backend.instances_of("abort-in-reserve"):
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # the ReserveKV call is on its way
        await backend.abort("abort-in-reserve")  # D has no such request yet: its Abort finds nothing
        gate.set()
        try:
            return await asyncio.wait_for(task, 30)
        finally:
            await backend.close()

    try:
        events = asyncio.run(scenario())
    finally:
        gate.set()
    assert [(e.token_ids, e.finish_reason) for e in events] == [((), FinishReason.ABORT)]
    assert backend.handovers == 0
    deadline = time.monotonic() + 5  # the reservation made after the abort is given back too
    while host.loop.call(lambda engine: engine.free_blocks) != BLOCKS and time.monotonic() < deadline:
        time.sleep(0.05)
    assert host.loop.call(lambda engine: engine.free_blocks) == BLOCKS


def test_one_token_requests_end_as_the_engine_ends_them(
    cluster: Cluster, reference: LLMEngine, tiny_model_dir: Path
) -> None:
    views = StaticViews(cluster.view(["prefill-0-g0", "decode-0-g0"]))
    backend = DisaggregatedBackend(views, load_tokenizer(tiny_model_dir), initial_view=views.view)
    (first,) = reference.generate([list(PROMPT)], SamplingParams(max_tokens=1))[0].token_ids
    stopped, length = _run(
        backend, _request("one-stop", max_tokens=1, stop_token_ids=(first,)), _request("one-length", max_tokens=1)
    )
    assert _tokens(stopped) == _tokens(length) == (first,)
    assert stopped[-1].finish_reason is FinishReason.STOP  # the first token is a stop token
    assert length[-1].finish_reason is FinishReason.LENGTH
    assert backend.handovers == 0


def test_readiness_follows_the_routers_view(cluster: Cluster, tiny_model_dir: Path) -> None:
    views = StaticViews(cluster.view(["prefill-0-g0"]))
    backend = DisaggregatedBackend(views, load_tokenizer(tiny_model_dir), initial_view=views.view)
    assert backend.readiness() == "no healthy decode or colocated instance"
    ready = StaticViews(cluster.view(["prefill-0-g0", "decode-0-g0"]))
    assert DisaggregatedBackend(ready, load_tokenizer(tiny_model_dir), initial_view=ready.view).readiness() is None
