"""Incremental detokenization: deltas add up to the full text; stop strings are cut and never streamed."""

from __future__ import annotations

from typing import Any

import pytest

from workers.engine.detokenizer import IncrementalDetokenizer
from workers.engine.tiny import build_tokenizer

_REPLACEMENT = "\ufffd"


class _Decoder:
    def __init__(self) -> None:
        self.tok = build_tokenizer(vocab_size=2000)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self.tok.decode(ids, skip_special_tokens=True))


@pytest.fixture(scope="module")
def decoder() -> _Decoder:
    return _Decoder()


def test_deltas_concatenate_to_the_full_text(decoder: _Decoder) -> None:
    text = "Hello wörld ✓ 東京 — the prefill worker reads the whole prompt."
    ids = decoder.encode(text)
    detok = IncrementalDetokenizer(decoder)
    deltas = []
    for t in ids:
        detok.add(t)
        deltas.append(detok.delta(finished=False))
    deltas.append(detok.delta(finished=True))
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_is_cut_and_never_streamed(decoder: _Decoder) -> None:
    ids = decoder.encode("one two three STOP four five")
    detok = IncrementalDetokenizer(decoder, stop=("STOP",))
    streamed = []
    for t in ids:
        detok.add(t)
        streamed.append(detok.delta(finished=False))
        if detok.stopped:
            break
    assert detok.stopped
    assert "".join(streamed) == "one two three "
    assert "S" not in "".join(streamed)


def test_text_is_released_when_no_stop_string_completes(decoder: _Decoder) -> None:
    ids = decoder.encode("a STO b")
    detok = IncrementalDetokenizer(decoder, stop=("STOP",))
    out = []
    for t in ids:
        detok.add(t)
        out.append(detok.delta(finished=False))
    out.append(detok.delta(finished=True))
    assert not detok.stopped
    assert "".join(out) == "a STO b"


def test_prior_tokens_are_context_not_output(decoder: _Decoder) -> None:
    prior = decoder.encode("already streamed")
    detok = IncrementalDetokenizer(decoder, prior_token_ids=prior)
    for t in decoder.encode(" and more"):
        detok.add(t)
    assert detok.delta(finished=True) == " and more"


class _MetaspaceDecoder:
    def __init__(self, tok: Any) -> None:
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self.tok.decode(ids, skip_special_tokens=True))


def _stream(detok: IncrementalDetokenizer, ids: list[int], finish: bool = True) -> list[str]:
    deltas = []
    for t in ids:
        detok.add(t)
        deltas.append(detok.delta(finished=False))
        if detok.stopped:
            break
    if finish:
        deltas.append(detok.delta(finished=True))
    return deltas


def test_output_text_continues_the_prompt_text_with_a_metaspace_decoder(metaspace_tokenizer: Any) -> None:
    decoder = _MetaspaceDecoder(metaspace_tokenizer)
    prompt, output = decoder.encode("The key value cache"), decoder.encode("is stored in fixed size blocks")
    assert metaspace_tokenizer.id_to_token(output[0]).startswith("\u2581")  # the word's space is in the token
    expected = decoder.decode(prompt + output)[len(decoder.decode(prompt)) :]
    assert expected == " is stored in fixed size blocks"
    assert "".join(_stream(IncrementalDetokenizer(decoder, prompt_token_ids=prompt), output)) == expected

    detok = IncrementalDetokenizer(decoder, stop=("fixed",), prompt_token_ids=prompt)
    assert "".join(_stream(detok, output, finish=False)) == " is stored in "
    assert detok.stopped and detok.text == " is stored in "


def test_prompt_context_ending_inside_a_character_is_not_used(decoder: _Decoder) -> None:
    ids = decoder.encode("plain 東京 text")
    cut = next(n for n in range(1, len(ids)) if decoder.decode(ids[:n]).endswith(_REPLACEMENT))
    detok = IncrementalDetokenizer(decoder, prompt_token_ids=ids[:cut])
    # the output starts with the character's remaining bytes, which decode on their own
    assert "".join(_stream(detok, ids[cut:])) == decoder.decode(ids[cut:])


def test_prior_tokens_replay_the_text_held_back_for_stop_strings(decoder: _Decoder) -> None:
    prompt, output = decoder.encode("A prompt:"), decoder.encode(" one two three four five six")
    stop = ("QQQQQQ",)  # never matches, holds back five characters
    whole = _stream(IncrementalDetokenizer(decoder, stop, prompt), output)
    for k in range(1, len(output)):
        first = _stream(IncrementalDetokenizer(decoder, stop, prompt), output[:k], finish=False)
        rest = _stream(IncrementalDetokenizer(decoder, stop, prompt, output[:k]), output[k:])
        assert "".join(first + rest) == "".join(whole) == " one two three four five six"


def test_finishing_delta_flushes_an_incomplete_character(decoder: _Decoder) -> None:
    ids = decoder.encode("ok 東京")
    cut = next(n for n in range(1, len(ids)) if decoder.decode(ids[:n]).endswith(_REPLACEMENT))
    deltas = _stream(IncrementalDetokenizer(decoder), ids[:cut])
    assert _REPLACEMENT not in "".join(deltas[:-1])  # streaming waits for the character to complete
    assert "".join(deltas) == decoder.decode(ids[:cut])
    assert deltas[-1].endswith(_REPLACEMENT)
