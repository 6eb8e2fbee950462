"""1 prefill + 1 decode worker on a real local Ray, real gRPC, real HTTP, driven by the openai client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from runtime_helpers import (
    NUM_KV_BLOCKS,
    Reference,
    async_client,
    client,
    prompt_of,
    status,
    view_ids,
    wait_for,
    worker_actor,
)

from orchestrator.runtime.embedded import EmbeddedHandle, start_embedded

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def live(ray_session: None, tiny_model_dir: Path) -> Iterator[EmbeddedHandle]:
    handle = start_embedded(model_dir=tiny_model_dir, num_prefill=1, num_decode=1, num_kv_blocks=NUM_KV_BLOCKS,
                            cluster_name="t1p1d", health_interval_s=0.3)
    yield handle
    handle.stop()


def test_openai_client_gets_the_engine_tokens_streamed_and_not(live: EmbeddedHandle, reference: Reference) -> None:
    c = client(live)
    model = live.model_dir.name
    for i, max_tokens in ((0, 24), (1, 40)):
        prompt = prompt_of(i)
        want_ids, want_text = reference.complete(prompt, max_tokens)
        full = c.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
        assert full.choices[0].text == want_text
        assert full.usage is not None and full.usage.completion_tokens == len(want_ids)
        chunks = c.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True)
        assert "".join(ch.choices[0].text for ch in chunks) == want_text
    # a short prompt takes the decode-local prefill path
    want_ids, want_text = reference.complete("Hello", 12)
    assert c.completions.create(model=model, prompt="Hello", max_tokens=12, temperature=0).choices[0].text == want_text
    # the KV moved over tcp, and the router published per-instance gauges
    metrics = httpx.get(live.url + "/metrics", timeout=10).text
    moved = [line for line in metrics.splitlines() if line.startswith('pdserve_kv_transfer_bytes_total{transport="tcp"}')]
    assert moved and float(moved[0].split()[-1]) > 0


def test_32_concurrent_requests_all_complete_with_the_engine_tokens(
    live: EmbeddedHandle, reference: Reference
) -> None:
    prompts = [prompt_of(100 + i, words=20 + i % 30) for i in range(32)]
    wants = [reference.complete(p, 16)[1] for p in prompts]

    async def run() -> list[str]:
        c = async_client(live)
        outs = await asyncio.gather(*(
            c.completions.create(model=live.model_dir.name, prompt=p, max_tokens=16, temperature=0) for p in prompts
        ))
        await c.close()
        return [o.choices[0].text for o in outs]

    assert asyncio.run(run()) == wants


def test_serving_continues_while_the_controller_restarts_and_it_adopts_the_workers(
    live: EmbeddedHandle, reference: Reference
) -> None:
    import ray

    before = status(live)
    ids_before = view_ids(live)
    ray.kill(live.controller, no_restart=False)  # Ray restarts it; it must rebuild its view
    c = client(live)
    prompt = prompt_of(7)
    want = reference.complete(prompt, 20)[1]
    # Routers keep their last view and talk to the workers directly meanwhile.
    for _ in range(3):
        assert c.completions.create(model=live.model_dir.name, prompt=prompt, max_tokens=20, temperature=0).choices[
            0
        ].text == want
    after = status(live)
    assert after["adopted"] == 2 and after["workers"] == 2 and after["replacements"] == 0
    assert after["version"] > before["version"]
    assert view_ids(live) == ids_before  # the same workers, not new ones


def test_killed_decode_with_no_other_left_ends_in_an_explicit_error_then_is_replaced(
    live: EmbeddedHandle, reference: Reference
) -> None:
    import ray

    c = client(live)
    model = live.model_dir.name
    (decode_id,) = [i for i in view_ids(live) if i.startswith("decode-")]
    # a long generation (ignore_eos), so the kill surely lands mid-stream
    stream = c.completions.create(model=model, prompt=prompt_of(3), max_tokens=1500, temperature=0, stream=True,
                                  extra_body={"ignore_eos": True})
    received = []
    started = time.monotonic()
    with pytest.raises(openai.APIError) as err:
        for chunk in stream:
            received.append(chunk.choices[0].text)
            if len(received) == 1:
                (instances,) = live.backend.active_requests().values()  # the one request in flight
                assert decode_id in instances
                ray.kill(worker_actor(live, decode_id))
    assert len(received) < 1500
    assert time.monotonic() - started < 30  # no hang
    assert "no healthy decode" in str(err.value)  # GenerationFailed, reported in-stream
    # the controller starts a replacement in the same slot and serving resumes
    wait_for(lambda: any(i.startswith("decode-0-g") and i != decode_id for i in view_ids(live)), 90,
             "a replacement decode worker")
    assert status(live)["replacements"] >= 1
    prompt = prompt_of(11)
    want = reference.complete(prompt, 10)[1]
    wait_for(lambda: _try(c, model, prompt) == want, 30, "serving on the replacement")


def _try(c: openai.OpenAI, model: str, prompt: str) -> str | None:
    try:
        return c.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0).choices[0].text
    except openai.APIError:
        return None



def test_the_advertised_context_window_is_the_one_the_workers_enforce(live: EmbeddedHandle) -> None:
    from workers.engine.config import EngineConfig
    from workers.engine.loader import load_model_config

    window = min(load_model_config(live.model_dir).max_position_embeddings, NUM_KV_BLOCKS * EngineConfig().block_size)
    card = httpx.get(live.url + "/v1/models", timeout=10).json()["data"][0]
    assert card["max_model_len"] == window
    asked = {"model": live.model_dir.name, "prompt": "Hello", "max_tokens": window}  # the prompt leaves less room
    answer = httpx.post(live.url + "/v1/completions", json=asked, timeout=30)
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "context_length_exceeded"
