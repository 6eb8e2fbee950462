"""Engine request handling: bad input never breaks the loop; stop conditions, streaming, seeds, roles."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from workers.engine.config import EngineConfig, EngineRole
from workers.engine.engine import LLMEngine
from workers.engine.outputs import (
    DuplicateRequest,
    FinishReason,
    InvalidRequest,
    PromptTooLong,
    RequestOutput,
    UnknownRequest,
)
from workers.engine.sampling_params import InvalidSamplingParams, SamplingParams

pytestmark = pytest.mark.slow

PROMPT = [11, 22, 33, 44, 55, 66, 77, 88, 99, 111, 222, 333]


@pytest.fixture(scope="module")
def engine(hf_tiny_model_dir: Path) -> LLMEngine:
    return LLMEngine(hf_tiny_model_dir, EngineConfig(num_blocks=128, max_model_len=256))


def _drain(engine: LLMEngine) -> dict[str, list[RequestOutput]]:
    outs: dict[str, list[RequestOutput]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            outs.setdefault(out.request_id, []).append(out)
    return outs


def _tokens(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def test_bad_input_raises_clearly_and_engine_keeps_serving(engine: LLMEngine) -> None:
    engine.add_request("busy", PROMPT, SamplingParams(max_tokens=8))
    first = engine.step()
    with pytest.raises(PromptTooLong, match=r"256 tokens \(set by EngineConfig.max_model_len\)"):
        engine.add_request("long", [5] * 256)
    with pytest.raises(InvalidRequest, match="prompt_token_ids must not be empty"):
        engine.add_request("empty", [])
    with pytest.raises(InvalidRequest, match=r"prompt_token_ids holds 999999, not a token id"):
        engine.add_request("oov", [1, 999999])
    with pytest.raises(InvalidRequest, match="prompt_token_ids holds 'a'"):
        engine.add_request("str", ["a"])  # type: ignore[list-item]
    with pytest.raises(InvalidSamplingParams, match="sampling must be SamplingParams"):
        engine.add_request("dict", PROMPT, {"temperature": 1.0})  # type: ignore[arg-type]
    with pytest.raises(InvalidSamplingParams, match="stop_token_ids holds -1"):
        engine.add_request("stopid", PROMPT, SamplingParams(stop_token_ids=(-1,)))
    with pytest.raises(DuplicateRequest, match="'busy'"):
        engine.add_request("busy", PROMPT)
    with pytest.raises(UnknownRequest, match="'nobody'"):
        engine.abort("nobody")
    with pytest.raises(InvalidRequest, match="request_id"):
        engine.add_request("", PROMPT)
    outs = _drain(engine)
    assert list(outs) == ["busy"]
    assert len(_tokens(first + outs["busy"])) == 8 and outs["busy"][-1].finish_reason is FinishReason.LENGTH
    assert engine.free_blocks == engine.total_blocks


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"stop": ("",)}, "stop strings"),
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"temperature": float("inf")}, "temperature must be a finite number"),
        ({"top_p": float("nan")}, "top_p"),
        ({"top_k": 2.0}, "top_k must be an integer"),
        ({"max_tokens": True}, "max_tokens must be an integer"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"stop_token_ids": (2.0,)}, "stop_token_ids must be an integer"),
    ],
)
def test_bad_sampling_values_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidSamplingParams, match=field):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_a_vanishing_temperature_samples_greedily_and_keeps_the_batch_running(engine: LLMEngine) -> None:
    # logits / 1e-40 overflow float32 to inf: sampled as such, the step raised after it had marked every
    # request of the batch computed, and the others never ran again
    tiny = SamplingParams(max_tokens=4, temperature=1e-40, seed=3)
    engine.add_request("tiny-temperature", PROMPT, tiny)
    engine.add_request("neighbour", PROMPT[:5], SamplingParams(max_tokens=4))
    outs = _drain(engine)
    greedy = engine.generate([PROMPT], SamplingParams(max_tokens=4))[0]
    assert _tokens(outs["tiny-temperature"]) == list(greedy.token_ids)
    assert len(_tokens(outs["neighbour"])) == 4
    assert engine.free_blocks == engine.total_blocks


def test_generate_with_one_bad_prompt_leaves_nothing_queued(engine: LLMEngine) -> None:
    with pytest.raises(PromptTooLong):
        engine.generate([PROMPT, PROMPT[:3], [5] * 256])
    assert not engine.has_unfinished() and engine.step() == []
    assert engine.free_blocks == engine.total_blocks


def test_abort_frees_blocks_and_reports_abort(engine: LLMEngine) -> None:
    engine.add_request("a", PROMPT * 3, SamplingParams(max_tokens=50))
    engine.step()
    engine.step()
    assert engine.free_blocks < engine.total_blocks
    engine.abort("a")
    assert engine.free_blocks == engine.total_blocks
    (out,) = engine.step()
    assert out.finished and out.finish_reason is FinishReason.ABORT and not engine.has_unfinished()


def test_a_dropped_request_leaves_no_output_for_a_request_that_reuses_its_id(engine: LLMEngine) -> None:
    engine.add_request("again", PROMPT * 3, SamplingParams(max_tokens=50))
    engine.step()
    engine.drop("again")  # its reader left: no final ABORT output
    engine.add_request("again", PROMPT, SamplingParams(max_tokens=4, ignore_eos=True))
    outs = _drain(engine)["again"]
    assert len(_tokens(outs)) == 4 and outs[-1].finish_reason is FinishReason.LENGTH
    engine.add_request("gone", PROMPT, SamplingParams(max_tokens=4))
    engine.abort("gone")  # aborted, then its reader left before the ABORT output was handed out
    engine.drop("gone")
    engine.drop("never-seen")  # nothing to do, no error
    assert engine.step() == [] and not engine.has_unfinished()
    engine.reserve("held", len(PROMPT))
    engine.drop("held")
    assert engine.free_blocks == engine.total_blocks


def test_stop_token_stop_string_and_streamed_text(engine: LLMEngine) -> None:
    assert engine.tokenizer is not None
    (full,) = engine.generate([PROMPT], SamplingParams(max_tokens=20, ignore_eos=True))
    assert full.finish_reason is FinishReason.LENGTH and len(full.token_ids) == 20
    assert full.text == engine.tokenizer.decode(list(full.token_ids))  # streamed deltas add up

    stop_tok = full.token_ids[5]
    first = full.token_ids.index(stop_tok)
    (r,) = engine.generate([PROMPT], SamplingParams(max_tokens=20, stop_token_ids=(stop_tok,)))
    assert r.finish_reason is FinishReason.STOP and r.token_ids == full.token_ids[: first + 1]

    stop_str = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    (s,) = engine.generate([PROMPT], SamplingParams(max_tokens=20, stop=(stop_str,)))
    assert s.finish_reason is FinishReason.STOP
    assert s.text == full.text[: full.text.index(stop_str)]
    assert engine.free_blocks == engine.total_blocks


def test_eos_stops_unless_ignored(hf_tiny_model_dir: Path, tmp_path: Path) -> None:
    base = LLMEngine(hf_tiny_model_dir, EngineConfig(num_blocks=64))
    (full,) = base.generate([PROMPT], SamplingParams(max_tokens=10, ignore_eos=True))
    eos = full.token_ids[3]
    model = tmp_path / "m"
    shutil.copytree(hf_tiny_model_dir, model)
    raw = json.loads((model / "config.json").read_text())
    raw["eos_token_id"] = eos
    (model / "config.json").write_text(json.dumps(raw))
    engine = LLMEngine(model, EngineConfig(num_blocks=64))
    (stopped,) = engine.generate([PROMPT], SamplingParams(max_tokens=10))
    assert stopped.finish_reason is FinishReason.STOP
    assert stopped.token_ids == full.token_ids[: full.token_ids.index(eos) + 1]
    (ignored,) = engine.generate([PROMPT], SamplingParams(max_tokens=10, ignore_eos=True))
    assert ignored.token_ids == full.token_ids


def test_context_window_ends_with_length(hf_tiny_model_dir: Path) -> None:
    engine = LLMEngine(hf_tiny_model_dir, EngineConfig(num_blocks=64, max_model_len=20))
    (r,) = engine.generate([PROMPT], SamplingParams(max_tokens=100))
    assert r.finish_reason is FinishReason.LENGTH and len(r.token_ids) == 20 - len(PROMPT)


def test_seeded_sampling_survives_preemption_and_resume(hf_tiny_model_dir: Path) -> None:
    sampling = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=7, ignore_eos=True)
    roomy = LLMEngine(hf_tiny_model_dir, EngineConfig(num_blocks=128))
    prompts = [PROMPT * k for k in (1, 2, 3, 4)]
    reference = [r.token_ids for r in roomy.generate(prompts, sampling)]
    assert len(set(reference[0])) > 5  # really sampled

    tight = LLMEngine(hf_tiny_model_dir, EngineConfig(num_blocks=30, block_size=4))
    assert [r.token_ids for r in tight.generate(prompts, sampling)] == reference
    assert tight.num_preemptions > 0

    resumed = LLMEngine(hf_tiny_model_dir, EngineConfig(num_blocks=128))
    resumed.resume_request("x", prompts[2], reference[2][:10], sampling)
    outs = _drain(resumed)["x"]
    assert tuple(_tokens(outs)) == reference[2][10:]
    assert outs[-1].num_output_tokens == 24


def test_unseeded_sampling_differs_between_requests(engine: LLMEngine) -> None:
    sampling = SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)
    a, b = engine.generate([PROMPT, PROMPT], sampling)
    assert a.token_ids != b.token_ids


def test_prefill_only_role_finishes_after_first_token(hf_tiny_model_dir: Path) -> None:
    colocated = LLMEngine(hf_tiny_model_dir, EngineConfig(num_blocks=64))
    expected = [
        r.token_ids[0] for r in colocated.generate([PROMPT, PROMPT[:5]], SamplingParams(max_tokens=3))
    ]
    engine = LLMEngine(hf_tiny_model_dir, EngineConfig(num_blocks=64, role=EngineRole.PREFILL_ONLY))
    results = engine.generate([PROMPT, PROMPT[:5]], SamplingParams(max_tokens=3))
    assert [r.token_ids for r in results] == [(t,) for t in expected]
    assert all(r.finish_reason is FinishReason.PREFILLED for r in results)
    assert engine.free_blocks == engine.total_blocks


def test_load_stats_follow_the_queue(hf_tiny_model_dir: Path) -> None:
    engine = LLMEngine(hf_tiny_model_dir, EngineConfig(num_blocks=64, max_num_batched_tokens=8))
    engine.add_request("a", PROMPT, SamplingParams(max_tokens=4))
    engine.add_request("b", PROMPT[:5], SamplingParams(max_tokens=4))
    stats = engine.stats()
    assert (stats.num_waiting, stats.num_running, stats.queued_prefill_tokens) == (2, 0, 17)
    engine.step()  # 8 of a's 12 prompt tokens
    stats = engine.stats()
    assert (stats.num_waiting, stats.num_running, stats.queued_prefill_tokens) == (1, 1, 9)
    assert stats.free_blocks == stats.total_blocks - 1
    engine.reserve("c", 40)
    assert engine.stats().num_reserved == 1 and engine.free_blocks == engine.total_blocks - 4
