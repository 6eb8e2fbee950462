"""The disaggregated backend over in-process workers (real engines, real gRPC, real tcp KV; no Ray)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

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
from orchestrator.runtime.disagg_backend import DisaggregatedBackend, RouterConfig, StaticViews
from workers.engine.config import EngineConfig, EngineRole
from workers.engine.engine import LLMEngine
from workers.engine.loader import load_tokenizer
from workers.engine.sampling_params import SamplingParams
from workers.kv.interface import FaultInjection, SenderOptions
from workers.kv.registry import KVClient
from workers.service.engine_loop import EngineLoop
from workers.service.host import WorkerHost, WorkerSpec
from workers.service.prefill import PrefillWorker
from workers.service.server import WorkerServer
from workers.service.types import WorkerEndpoint

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
