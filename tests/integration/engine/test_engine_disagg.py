"""Disaggregation hooks: prefill on one engine, KV pushed layer by layer, decode on another."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from workers.engine.block_manager import OutOfKVBlocks
from workers.engine.config import EngineConfig, EngineRole
from workers.engine.engine import LLMEngine
from workers.engine.outputs import FinishReason, InvalidRequest, UnknownRequest, WrongRole
from workers.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = [[7], [300 + i for i in range(37)], [1000 + 3 * i for i in range(130)], [50, 60, 70, 80]]


def _colocated(model_dir: Path, sampling: SamplingParams) -> list[tuple[int, ...]]:
    engine = LLMEngine(model_dir, EngineConfig(num_blocks=128))
    return [r.token_ids for r in engine.generate(PROMPTS, sampling)]


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingParams(max_tokens=12),
        SamplingParams(max_tokens=12, temperature=0.8, top_k=50, seed=3, ignore_eos=True),
    ],
    ids=["greedy", "seeded"],
)
def test_prefill_push_then_decode_equals_colocated(hf_tiny_model_dir: Path, sampling: SamplingParams) -> None:
    expected = _colocated(hf_tiny_model_dir, sampling)
    prefill = LLMEngine(hf_tiny_model_dir, EngineConfig(num_blocks=64, role=EngineRole.PREFILL_ONLY))
    decode = LLMEngine(hf_tiny_model_dir, EngineConfig(num_blocks=128, role=EngineRole.DECODE_ONLY))
    layout = prefill.kv_layout
    assert layout == decode.kv_layout and layout.dtype == torch.float32
    firsts = {}
    for i, prompt in enumerate(PROMPTS):
        rid = f"r{i}"
        decode.reserve(rid, len(prompt))

        def push(layer: int, k: torch.Tensor, v: torch.Tensor, rid: str = rid, n: int = len(prompt)) -> None:
            assert k.shape == v.shape == (n, layout.num_kv_heads, layout.head_dim)
            assert k.is_contiguous() and v.is_contiguous()
            decode.write_layer_kv(rid, layer, k, v)

        firsts[rid] = prefill.prefill(rid, prompt, sampling, on_layer_kv=push)
        assert prefill.free_blocks == prefill.total_blocks  # prefill's own blocks are gone
        decode.add_prefilled_request(rid, prompt, firsts[rid], sampling)
    got: dict[str, list[int]] = {rid: [t] for rid, t in firsts.items()}
    while decode.has_unfinished():
        for out in decode.step():
            got[out.request_id].extend(out.new_token_ids)
    assert [tuple(got[f"r{i}"]) for i in range(len(PROMPTS))] == expected
    assert decode.free_blocks == decode.total_blocks


def test_layer_kv_is_handed_out_before_the_next_layer_runs(hf_tiny_model_dir: Path) -> None:
    engine = LLMEngine(hf_tiny_model_dir, EngineConfig(num_blocks=64))
    events: list[tuple[str, int]] = []
    for i, layer in enumerate(engine.model.decoder_layers()):
        layer.self_attn.register_forward_pre_hook(lambda _m, _a, i=i: events.append(("attn", i)))
    engine.prefill("p", PROMPTS[2], on_layer_kv=lambda i, k, v: events.append(("kv", i)))
    n = engine.model_config.num_layers
    assert events == [e for i in range(n) for e in (("attn", i), ("kv", i))]


def test_reservation_errors_and_release(hf_tiny_model_dir: Path) -> None:
    engine = LLMEngine(hf_tiny_model_dir, EngineConfig(num_blocks=8, block_size=16))
    table = engine.reserve("a", 100)
    assert len(table) == 7 and engine.free_blocks == 1
    with pytest.raises(OutOfKVBlocks, match="'b' needs 2 more KV blocks"):
        engine.reserve("b", 20)
    layout = engine.kv_layout
    with pytest.raises(ValueError, match="layer 0 K/V must both be"):
        engine.write_layer_kv("a", 0, torch.zeros(100, 1, 2), torch.zeros(100, 1, 2))
    with pytest.raises(InvalidRequest, match="do not fit the 100 reserved tokens"):
        kv = torch.zeros(101, layout.num_kv_heads, layout.head_dim)
        engine.write_layer_kv("a", 0, kv, kv)
    with pytest.raises(UnknownRequest, match="'zzz'"):
        engine.write_layer_kv("zzz", 0, kv, kv)
    with pytest.raises(InvalidRequest, match="99 tokens but 100 were reserved"):
        engine.add_prefilled_request("a", list(range(99)), 5)
    engine.release("a")
    assert engine.free_blocks == engine.total_blocks
    with pytest.raises(UnknownRequest):
        engine.release("a")


def test_written_kv_reads_back_in_chunks(hf_tiny_model_dir: Path) -> None:
    engine = LLMEngine(hf_tiny_model_dir, EngineConfig(num_blocks=16, block_size=4))
    layout = engine.kv_layout
    k = torch.randn(10, layout.num_kv_heads, layout.head_dim)
    v = torch.randn(10, layout.num_kv_heads, layout.head_dim)
    table = engine.reserve("a", 10)
    engine.write_layer_kv("a", 1, k[:6], v[:6])
    engine.write_layer_kv("a", 1, k[6:], v[6:], token_offset=6)
    rk, rv = engine.kv_cache.read_layer(1, table, 10)
    assert torch.equal(rk, k) and torch.equal(rv, v)


def test_first_token_counts_against_stop_conditions(hf_tiny_model_dir: Path) -> None:
    engine = LLMEngine(hf_tiny_model_dir, EngineConfig(num_blocks=16))
    engine.reserve("a", 4)
    engine.add_prefilled_request("a", PROMPTS[3], 9, SamplingParams(max_tokens=1))
    assert engine.free_blocks == engine.total_blocks
    (out,) = engine.step()
    assert out.finished and out.finish_reason is FinishReason.LENGTH
    assert out.new_token_ids == () and out.num_output_tokens == 1
    engine.reserve("b", 4)
    engine.add_prefilled_request("b", PROMPTS[3], 9, SamplingParams(max_tokens=5, stop_token_ids=(9,)))
    (out,) = engine.step()
    assert out.finish_reason is FinishReason.STOP


def test_roles_refuse_the_other_side(hf_tiny_model_dir: Path) -> None:
    prefill = LLMEngine(hf_tiny_model_dir, EngineConfig(num_blocks=16, role=EngineRole.PREFILL_ONLY))
    with pytest.raises(WrongRole):
        prefill.reserve("a", 4)
    decode = LLMEngine(hf_tiny_model_dir, EngineConfig(num_blocks=16, role=EngineRole.DECODE_ONLY))
    with pytest.raises(WrongRole):
        decode.prefill("a", [1, 2, 3])
