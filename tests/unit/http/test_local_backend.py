"""LocalEngineBackend over a small in-memory engine: streaming, deadlines, aborts, engine failures."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from orchestrator.runtime.backend import (
    DeadlineExceeded,
    FinishReason,
    GenerationFailed,
    GenerationRequest,
    InvalidRequest,
    TokenEvent,
)
from orchestrator.runtime.local_backend import LocalEngineBackend
from workers.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class Out:
    request_id: str
    new_token_ids: tuple[int, ...]
    new_text: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int


class CountingEngine:
    """Emits token ``n`` as text ``"<n>"`` per step per request; thread ownership is checked."""

    def __init__(self, step_s: float = 0.0, fail_at_step: int | None = None) -> None:
        self.step_s = step_s
        self.fail_at_step = fail_at_step
        self.steps = 0
        self.reqs: dict[str, tuple[int, int, int]] = {}  # id -> (prompt, produced, max)
        self.aborted: list[str] = []
        self.threads: set[int] = set()

    def add_request(self, request_id: str, prompt_token_ids: Sequence[int], sampling: SamplingParams) -> None:
        self.threads.add(threading.get_ident())
        if len(prompt_token_ids) > 100:
            raise ValueError("prompt too long")
        self.reqs[request_id] = (len(prompt_token_ids), 0, sampling.max_tokens)

    def abort(self, request_id: str) -> None:
        self.threads.add(threading.get_ident())
        if self.reqs.pop(request_id, None) is None:
            raise LookupError(request_id)
        self.aborted.append(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.reqs)

    def step(self) -> list[Out]:
        self.threads.add(threading.get_ident())
        self.steps += 1
        if self.fail_at_step is not None and self.steps >= self.fail_at_step:
            raise RuntimeError("device lost")
        time.sleep(self.step_s)
        outs = []
        for rid, (prompt, produced, limit) in list(self.reqs.items()):
            produced += 1
            done = produced >= limit
            outs.append(Out(rid, (produced,), f"<{produced}>", done, "length" if done else None, prompt, produced))
            if done:
                del self.reqs[rid]
            else:
                self.reqs[rid] = (prompt, produced, limit)
        return outs


def _request(rid: str, max_tokens: int = 3, timeout_s: float = 30.0, prompt: int = 4) -> GenerationRequest:
    now = time.time()
    return GenerationRequest(rid, tuple(range(prompt)), SamplingParams(max_tokens=max_tokens), now, now + timeout_s)


async def _drain(backend: LocalEngineBackend, request: GenerationRequest) -> list[TokenEvent]:
    return [event async for event in backend.generate(request)]


def test_streams_tokens_for_concurrent_requests_from_one_engine_thread() -> None:
    engine = CountingEngine()
    backend = LocalEngineBackend(engine)

    async def main() -> list[list[TokenEvent]]:
        return await asyncio.gather(*(_drain(backend, _request(f"r{i}", max_tokens=i + 1)) for i in range(5)))

    try:
        results = asyncio.run(main())
    finally:
        backend.close()
    for i, events in enumerate(results):
        assert "".join(e.text for e in events) == "".join(f"<{n}>" for n in range(1, i + 2))
        assert events[-1].finish_reason is FinishReason.LENGTH
        assert events[-1].completion_tokens == i + 1 and events[-1].prompt_tokens == 4
    assert len(engine.threads) == 1 and threading.get_ident() not in engine.threads


def test_deadline_raises_and_aborts_in_engine() -> None:
    engine = CountingEngine(step_s=0.01)
    backend = LocalEngineBackend(engine)
    try:
        with pytest.raises(DeadlineExceeded):
            asyncio.run(_drain(backend, _request("slow", max_tokens=10_000, timeout_s=0.2)))
        deadline = time.monotonic() + 5
        while engine.reqs and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.aborted == ["slow"] and not engine.reqs
    finally:
        backend.close()


def test_abort_from_elsewhere_ends_the_stream_with_abort() -> None:
    engine = CountingEngine(step_s=0.005)
    backend = LocalEngineBackend(engine)

    async def main() -> list[TokenEvent]:
        events: list[TokenEvent] = []
        async for event in backend.generate(_request("a", max_tokens=10_000)):
            events.append(event)
            if len(events) == 3:
                await backend.abort("a")
        return events

    try:
        events = asyncio.run(main())
    finally:
        backend.close()
    assert events[-1].finish_reason is FinishReason.ABORT
    assert engine.aborted == ["a"]


def test_engine_refusal_and_failure_become_backend_errors() -> None:
    engine = CountingEngine(fail_at_step=3)
    backend = LocalEngineBackend(engine)
    try:
        with pytest.raises(InvalidRequest, match="prompt too long"):
            asyncio.run(_drain(backend, _request("big", prompt=500)))

        async def two() -> list[BaseException | list[TokenEvent]]:
            first, second = await asyncio.gather(
                _drain(backend, _request("x", 50)), _drain(backend, _request("y", 50)), return_exceptions=True
            )
            return [first, second]

        results = asyncio.run(two())
        assert all(isinstance(r, GenerationFailed) and "device lost" in str(r) for r in results)
    finally:
        backend.close()


def test_closed_backend_refuses() -> None:
    backend = LocalEngineBackend(CountingEngine())
    backend.close()
    with pytest.raises(GenerationFailed):
        asyncio.run(_drain(backend, _request("late")))
