"""Two engines in one process joined by the in-process transport: the simulator's path, same tokens."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from workers.engine.config import EngineConfig, EngineRole
from workers.engine.engine import LLMEngine
from workers.engine.sampling_params import SamplingParams
from workers.kv.engine_link import expect_into_engine, prefill_and_send
from workers.kv.errors import KVChecksumError
from workers.kv.interface import FaultInjection, SenderOptions
from workers.kv.local_pair import reference_tokens
from workers.kv.registry import KVClient, open_endpoint

SAMPLING = SamplingParams(max_tokens=5, ignore_eos=True)


def _decode_all(engine: LLMEngine, request_id: str) -> list[int]:
    tokens: list[int] = []
    while True:
        for out in engine.step():
            if out.request_id == request_id:
                tokens.extend(out.new_token_ids)
                if out.finished:
                    return tokens


@pytest.mark.parametrize("overlap", [True, False])
def test_memory_transport_between_engines_matches_colocated(tiny_model_dir: Path, overlap: bool) -> None:
    prompt = tuple(random.Random(3).randrange(10, 30000) for _ in range(77))
    expected = reference_tokens(tiny_model_dir, [prompt], SAMPLING)[0]
    prefill = LLMEngine(tiny_model_dir, EngineConfig(role=EngineRole.PREFILL_ONLY))
    decode = LLMEngine(tiny_model_dir, EngineConfig(role=EngineRole.DECODE_ONLY))
    endpoint = open_endpoint("memory")
    client = KVClient()
    try:
        rx = expect_into_engine(decode, endpoint, "m1", len(prompt))
        sent = prefill_and_send(prefill, client.open(rx.descriptor), "m1", prompt, SAMPLING, overlap=overlap)
        stats = rx.wait(10)
        assert stats.num_bytes == sent.stats.num_bytes == 4 * 77 * 2 * 64 * 4 * 2
        decode.add_prefilled_request("m1", prompt, sent.first_token_id, SAMPLING)
        assert (sent.first_token_id, *_decode_all(decode, "m1")) == expected
    finally:
        client.close()
        endpoint.close()


def test_corrupted_kv_never_reaches_decoding(tiny_model_dir: Path) -> None:
    prompt = tuple(range(100, 140))
    prefill = LLMEngine(tiny_model_dir, EngineConfig(role=EngineRole.PREFILL_ONLY))
    decode = LLMEngine(tiny_model_dir, EngineConfig(role=EngineRole.DECODE_ONLY))
    endpoint = open_endpoint("memory")
    client = KVClient(SenderOptions(fault=FaultInjection(corrupt_layer_idx=2)))
    try:
        free_before = decode.free_blocks
        rx = expect_into_engine(decode, endpoint, "bad", len(prompt))
        with pytest.raises(KVChecksumError, match="'bad' layer 2"):
            prefill_and_send(prefill, client.open(rx.descriptor), "bad", prompt, SAMPLING)
        with pytest.raises(KVChecksumError):
            rx.wait(5)
        decode.release("bad")  # the decode worker's recovery path: drop the reservation, recompute or retry
        assert decode.free_blocks == free_before
    finally:
        client.close()
        endpoint.close()
