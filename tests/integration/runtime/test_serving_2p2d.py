"""2 prefill + 2 decode workers: identical tokens, and failover when workers die mid-request."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

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
    handle = start_embedded(model_dir=tiny_model_dir, num_prefill=2, num_decode=2, num_kv_blocks=NUM_KV_BLOCKS,
                            cluster_name="t2p2d", health_interval_s=0.3)
    yield handle
    handle.stop()


def test_openai_client_gets_the_engine_tokens_over_two_pairs(live: EmbeddedHandle, reference: Reference) -> None:
    prompts = [prompt_of(200 + i, words=30 + 5 * i) for i in range(32)]
    wants = [reference.complete(p, 20)[1] for p in prompts]

    async def run() -> tuple[list[str], list[str]]:
        c = async_client(live)
        full = await asyncio.gather(*(
            c.completions.create(model=live.model_dir.name, prompt=p, max_tokens=20, temperature=0) for p in prompts
        ))

        async def streamed(p: str) -> str:
            chunks = await c.completions.create(model=live.model_dir.name, prompt=p, max_tokens=20, temperature=0,
                                                stream=True)
            return "".join([ch.choices[0].text async for ch in chunks])

        streams = await asyncio.gather(*(streamed(p) for p in prompts[:8]))
        await c.close()
        return [o.choices[0].text for o in full], list(streams)

    full, streams = asyncio.run(run())
    assert full == wants
    assert streams == wants[:8]
    # both pairs served: the routing spread the burst
    loads = {i.instance_id for i in live.backend.view.snapshot.instances}
    assert {i for i in loads if i.startswith("prefill-")} and len(loads) == 4


def test_decode_killed_mid_stream_finishes_on_the_other_with_the_same_tokens(
    live: EmbeddedHandle, reference: Reference
) -> None:
    c = client(live)
    prompt = prompt_of(5)
    want_ids, want_text = reference.complete(prompt, 500, ignore_eos=True)
    stream = c.completions.create(model=live.model_dir.name, prompt=prompt, max_tokens=500, temperature=0,
                                  stream=True, extra_body={"ignore_eos": True})
    texts: list[str] = []
    victim = None
    handovers = live.backend.handovers
    for chunk in stream:
        texts.append(chunk.choices[0].text)
        if len(texts) == 1:  # token 1 came from the prefill worker; the decode worker streams the rest
            (instances,) = live.backend.active_requests().values()  # the one request in flight
            (victim,) = [i for i in instances if i.startswith("decode-")]
            import ray

            ray.kill(worker_actor(live, victim))
    assert "".join(texts) == want_text
    assert live.backend.handovers > handovers
    assert victim is not None
    wait_for(lambda: len([i for i in view_ids(live) if i.startswith("decode-")]) == 2 and victim not in view_ids(live),
             90, "the controller to replace the killed decode worker")


def test_prefill_killed_while_prefilling_the_requests_are_prefilled_elsewhere(
    live: EmbeddedHandle, reference: Reference
) -> None:
    import ray

    wait_for(lambda: len(view_ids(live)) == 4, 90, "four healthy workers")
    prompts = [prompt_of(300 + i, words=400) for i in range(6)]  # long prompts: prefill takes a while
    wants = [reference.complete(p, 8)[1] for p in prompts]
    victim = "prefill-0-g0" if "prefill-0-g0" in view_ids(live) else sorted(
        i for i in view_ids(live) if i.startswith("prefill-"))[0]
    handovers = live.backend.handovers
    killer = threading.Timer(0.15, lambda: ray.kill(worker_actor(live, victim)))

    async def run() -> list[str]:
        c = async_client(live)
        killer.start()
        outs = await asyncio.gather(*(
            c.completions.create(model=live.model_dir.name, prompt=p, max_tokens=8, temperature=0) for p in prompts
        ))
        await c.close()
        return [o.choices[0].text for o in outs]

    started = time.monotonic()
    assert asyncio.run(run()) == wants
    assert time.monotonic() - started < 60
    assert live.backend.handovers > handovers  # some request was re-prefilled on the other worker
    wait_for(lambda: status(live)["workers"] == 4 and victim not in view_ids(live), 90, "a replacement prefill worker")
