"""Client disconnects abort the request in the engine; /metrics counts match the requests made."""

from __future__ import annotations

import time

import httpx
import openai
from http_live_support import MODEL, LiveServer
from prometheus_client.parser import text_string_to_metric_families


def _wait_engine_idle(live: LiveServer, timeout_s: float = 5.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if live.backend.num_running == 0 and not live.engine.has_unfinished():
            return time.monotonic() - start
        time.sleep(0.01)
    raise AssertionError("the engine still has unfinished requests after the client left")


def _samples(live: LiveServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(live.url + "/metrics", timeout=10).text
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _aborts(live: LiveServer) -> float:
    key = ("pdserve_requests_total", (("outcome", "abort"), ("reason", "client_disconnected")))
    return _samples(live).get(key, 0.0)


def test_disconnect_mid_stream_aborts_in_engine(live: LiveServer) -> None:
    aborts_before = _aborts(live)
    body = {"model": MODEL, "prompt": "tell me a long story", "max_tokens": 2000, "ignore_eos": True,
            "stream": True}
    with httpx.Client(timeout=30) as client, client.stream("POST", live.url + "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        received = [line for line, _ in zip(lines, range(6), strict=False) if line.startswith("data:")]
        assert received and live.backend.num_running == 1
    # leaving both context managers closed the connection with ~1990 tokens (>10 s) still to go
    _wait_engine_idle(live)
    assert _aborts(live) == aborts_before + 1


def test_disconnect_while_waiting_for_a_whole_response_aborts(live: LiveServer) -> None:
    body = {"model": MODEL, "prompt": "another long story", "max_tokens": 2000, "ignore_eos": True}
    try:
        httpx.post(live.url + "/v1/completions", json=body, timeout=0.5)
        raise AssertionError("the request should outlast the client's timeout")
    except httpx.ReadTimeout:
        pass
    _wait_engine_idle(live)


def test_metrics_count_the_requests_made(live: LiveServer) -> None:
    slo = "metrics-test"
    before = _samples(live)
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0,
                           default_headers={"x-pdserve-slo-class": slo})
    for max_tokens in (3, 4):
        client.completions.create(model=MODEL, prompt="count me", max_tokens=max_tokens,
                                  extra_body={"ignore_eos": True})
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                            stream=True, extra_body={"ignore_eos": True})
    assert sum(1 for _ in stream) >= 1
    bad = httpx.post(live.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "n": 2},
                     headers={"x-pdserve-slo-class": slo})
    assert bad.status_code == 400

    after = _samples(live)
    label = (("slo_class", slo),)
    for hist in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds"):
        assert after[(f"pdserve_{hist}_count", label)] == 3, hist
        assert after[(f"pdserve_{hist}_sum", label)] > 0
        inf_bucket = (f"pdserve_{hist}_bucket", (("le", "+Inf"), ("slo_class", slo)))
        assert after[inf_bucket] == 3
    length_key = ("pdserve_requests_total", (("outcome", "length"), ("reason", "length")))
    assert after[length_key] - before.get(length_key, 0.0) == 3
    invalid_key = ("pdserve_requests_total", (("outcome", "invalid"), ("reason", "invalid_value")))
    assert after[invalid_key] - before.get(invalid_key, 0.0) == 1
    gen_key = ("pdserve_generation_tokens_total", ())
    assert after[gen_key] - before.get(gen_key, 0.0) == 3 + 4 + 5
    e2e_sum = after[("pdserve_e2e_request_latency_seconds_sum", label)]
    ttft_sum = after[("pdserve_time_to_first_token_seconds_sum", label)]
    assert e2e_sum > ttft_sum
    # the in-process backend exports its engine's KV occupancy after every step
    free = after[("pdserve_kv_blocks_free", (("instance", "local"), ("role", "colocated")))]
    used = after[("pdserve_kv_blocks_used", (("instance", "local"), ("role", "colocated")))]
    assert free + used == live.engine.total_blocks and free > 0
