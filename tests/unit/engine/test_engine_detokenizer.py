"""Incremental detokenization: deltas add up to the full text; stop strings are cut and never streamed."""

from __future__ import annotations

import pytest

from workers.engine.detokenizer import IncrementalDetokenizer
from workers.engine.tiny import build_tokenizer


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
