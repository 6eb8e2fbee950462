"""Incremental detokenization for streaming, with stop strings.

Text is produced from a short window of recent tokens, so each step costs two
small decodes regardless of output length. The window starts on the last few
prompt tokens, which are never emitted: decoders that strip the leading space of
what they decode (SentencePiece ``Metaspace`` / ``Strip``) then keep the first
output word's space. A delta that ends in an incomplete UTF-8 sequence waits for
the next token; the finishing delta flushes it as U+FFFD, as ``decode`` does.
While stop strings are configured the last ``len(longest stop) - 1`` characters
are held back, so a stop string is never streamed and the final text ends right
before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

_REPLACEMENT = "\ufffd"

# Prompt tokens decoded ahead of the output: enough that special tokens skipped by the decoder
# still leave some text whose leading space the decoder can strip instead of the output's.
PROMPT_CONTEXT_TOKENS = 6


class Decoder(Protocol):
    """Anything that turns token ids into text."""

    def decode(self, token_ids: list[int]) -> str:
        """Text of the token ids."""
        ...


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas and detects stop strings.

    ``prior_token_ids`` are output tokens another detokenizer already streamed, one ``delta`` per
    token: they are replayed, so the text that one still held back is streamed here.
    """

    def __init__(
        self,
        decoder: Decoder | None,
        stop: Sequence[str] = (),
        prompt_token_ids: Sequence[int] = (),
        prior_token_ids: Sequence[int] = (),
    ) -> None:
        self._decoder = decoder
        self._stop = tuple(stop)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._ids = self._context(prompt_token_ids)
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.text = ""
        self._emitted = 0
        self.stopped = False
        for token_id in prior_token_ids:
            self.add(token_id)
        self.delta(finished=False)  # what the earlier detokenizer streamed for the prior tokens

    def _context(self, prompt_token_ids: Sequence[int]) -> list[int]:
        """The prompt's last tokens, or none if their text ends inside a character.

        The output's first bytes would complete that character, so its text could not be split
        between prompt and output; without context they decode on their own, as U+FFFD.
        """
        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        if self._decoder is None or not context or self._decoder.decode(context).endswith(_REPLACEMENT):
            return []
        return context

    def add(self, token_id: int) -> None:
        """Append one token; sets ``stopped`` when the text now contains a stop string."""
        if self._decoder is None or self.stopped:
            return
        self._ids.append(token_id)
        prefix = self._decoder.decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decoder.decode(self._ids[self._prefix_offset :])
        if len(full) <= len(prefix) or full.endswith(_REPLACEMENT):
            return
        start = len(self.text)
        self.text += full[len(prefix) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        if self._stop:
            window = max(0, start - self._hold)
            hits = [i for i in (self.text.find(s, window) for s in self._stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True

    def _flush(self) -> None:
        """Add the text of tokens still waiting for a character to complete, as ``decode`` gives it."""
        if self._decoder is None or self.stopped or self._read_offset == len(self._ids):
            return
        prefix = self._decoder.decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decoder.decode(self._ids[self._prefix_offset :])
        self.text += full[len(prefix) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)

    def delta(self, finished: bool) -> str:
        """Text not yet handed out; holds back a possible stop-string prefix unless ``finished``."""
        if finished:
            self._flush()
        end = len(self.text) if finished or self.stopped else max(self._emitted, len(self.text) - self._hold)
        out = self.text[self._emitted : end]
        self._emitted = end
        return out
