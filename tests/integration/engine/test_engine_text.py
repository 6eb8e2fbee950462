"""Engine text: it continues the prompt's text, survives a resume or a failed step, and ends as decode() ends."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from workers.engine.config import EngineConfig, EngineRole
from workers.engine.engine import LLMEngine
from workers.engine.outputs import FinishReason, RequestOutput
from workers.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

PROMPT = [11, 22, 33, 44, 55, 66, 77, 88, 99, 111, 222, 333]
_REPLACEMENT = "\ufffd"


def _drain(engine: LLMEngine) -> dict[str, list[RequestOutput]]:
    outs: dict[str, list[RequestOutput]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            outs.setdefault(out.request_id, []).append(out)
    return outs


def test_metaspace_output_keeps_the_first_words_space(metaspace_model_dir: Path) -> None:
    engine = LLMEngine(metaspace_model_dir, EngineConfig(num_blocks=128, block_size=4))
    tok = engine.tokenizer
    assert tok is not None
    words = "the key value cache is stored in fixed size blocks each request owns a table".split()
    prompts = [tok.encode(" ".join(words[i : i + 4])) for i in range(0, 12, 2)]
    results = engine.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))
    for prompt, r in zip(prompts, results, strict=True):
        assert r.text == tok.decode(prompt + list(r.token_ids))[len(tok.decode(prompt)) :]
    assert any(r.text.startswith(" ") for r in results)  # some output starts a new word

    stopped = engine.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True, stop=(" ",)))
    for full, r in zip(results, stopped, strict=True):  # a leading space is there to stop at
        assert r.text == full.text.split(" ")[0]


def test_resume_streams_the_text_held_back_for_stop_strings(hf_tiny_model_dir: Path) -> None:
    sampling = SamplingParams(max_tokens=16, ignore_eos=True, stop=("QQQQQQ",))  # holds back five characters
    first = LLMEngine(hf_tiny_model_dir, EngineConfig(num_blocks=64))
    first.add_request("x", PROMPT, sampling)
    outs = _drain(first)["x"]
    tokens = [t for o in outs for t in o.new_token_ids]
    whole = "".join(o.new_text for o in outs)
    assert len(whole) > 5
    for k in (1, 8, 15):
        resumed = LLMEngine(hf_tiny_model_dir, EngineConfig(num_blocks=64))
        resumed.resume_request("x", PROMPT, tokens[:k], sampling)
        rest = _drain(resumed)["x"]
        assert [t for o in rest for t in o.new_token_ids] == tokens[k:]
        assert "".join(o.new_text for o in outs[:k]) + "".join(o.new_text for o in rest) == whole


def test_prefill_only_engine_finishes_a_resume_with_one_token_left(hf_tiny_model_dir: Path) -> None:
    sampling = SamplingParams(max_tokens=10, ignore_eos=True)
    colocated = LLMEngine(hf_tiny_model_dir, EngineConfig(num_blocks=64))
    (ref,) = colocated.generate([PROMPT], sampling)
    config = EngineConfig(num_blocks=64, max_num_batched_tokens=len(PROMPT) + 3, role=EngineRole.PREFILL_ONLY)
    engine = LLMEngine(hf_tiny_model_dir, config)
    engine.resume_request("r", PROMPT, ref.token_ids[:4], sampling)  # one token more than the budget
    steps = 0
    while engine.has_unfinished() and steps < 5:
        outs = engine.step()
        steps += 1
    assert steps == 2
    assert [(o.new_token_ids, o.finish_reason) for o in outs] == [
        ((ref.token_ids[4],), FinishReason.PREFILLED)
    ]
    assert engine.free_blocks == engine.total_blocks


def test_outputs_queued_before_a_failed_step_come_with_the_next_one(hf_tiny_model_dir: Path) -> None:
    engine = LLMEngine(hf_tiny_model_dir, EngineConfig(num_blocks=64))
    engine.add_request("a", PROMPT, SamplingParams(max_tokens=5, ignore_eos=True))
    engine.add_request("b", PROMPT[:6], SamplingParams(max_tokens=5, ignore_eos=True))
    engine.step()
    engine.abort("a")

    def fail(_module: torch.nn.Module, _args: object) -> None:
        raise RuntimeError("device fault")

    handle = engine.model.decoder_layers()[0].self_attn.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="device fault"):
        engine.step()
    handle.remove()
    outs = _drain(engine)
    assert [(o.finish_reason, o.new_token_ids) for o in outs["a"]] == [(FinishReason.ABORT, ())]
    assert outs["b"][-1].finish_reason is FinishReason.LENGTH and outs["b"][-1].num_output_tokens == 5
    assert engine.free_blocks == engine.total_blocks


def test_text_ending_inside_a_character_ends_as_decode_gives_it(hf_tiny_model_dir: Path) -> None:
    engine = LLMEngine(hf_tiny_model_dir, EngineConfig(num_blocks=64))
    tok = engine.tokenizer
    assert tok is not None
    # tokens that are no whole character on their own: stopping on one ends the text inside a character
    partial = tuple(
        i for i in range(engine.model_config.vocab_size) if tok.decode([i]).endswith(_REPLACEMENT)
    )
    sampling = SamplingParams(
        max_tokens=500, temperature=1.5, seed=0, ignore_eos=True, stop_token_ids=partial
    )
    (r,) = engine.generate([PROMPT], sampling)
    assert r.finish_reason is FinishReason.STOP and r.token_ids[-1] in partial
    assert r.text == tok.decode(list(r.token_ids))
    assert r.text.endswith(_REPLACEMENT)


def test_text_streamed_across_a_prefill_handover_equals_colocated_text(metaspace_model_dir: Path) -> None:
    colocated = LLMEngine(metaspace_model_dir, EngineConfig(num_blocks=64))
    tok = colocated.tokenizer
    assert tok is not None
    prompt = tok.encode("each request owns a table of")
    colocated.add_request("ref", prompt, SamplingParams(max_tokens=10, ignore_eos=True))
    outs = _drain(colocated)["ref"]
    first_text, text = outs[0].new_text, "".join(o.new_text for o in outs)
    assert len(first_text) >= 2
    # a stop string that begins in the first token's text and ends in the next tokens'
    sampling = SamplingParams(
        max_tokens=10, ignore_eos=True, stop=(text[len(first_text) - 1 : len(first_text) + 2],)
    )
    (ref,) = colocated.generate([prompt], sampling)
    assert ref.finish_reason is FinishReason.STOP

    prefill = LLMEngine(metaspace_model_dir, EngineConfig(num_blocks=64, role=EngineRole.PREFILL_ONLY))
    (head,) = prefill.generate([prompt], sampling)
    assert head.finish_reason is FinishReason.PREFILLED
    decode = LLMEngine(metaspace_model_dir, EngineConfig(num_blocks=64, role=EngineRole.DECODE_ONLY))
    decode.reserve("x", len(prompt))
    prefill.prefill("x", prompt, sampling, on_layer_kv=lambda i, k, v: decode.write_layer_kv("x", i, k, v))
    decode.add_prefilled_request("x", prompt, head.token_ids[0], sampling)
    rest = _drain(decode)["x"]
    assert head.token_ids + tuple(t for o in rest for t in o.new_token_ids) == ref.token_ids
    assert head.text + "".join(o.new_text for o in rest) == ref.text
