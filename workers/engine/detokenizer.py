"""Incremental detokenization for streaming, with stop strings.

Text is produced from a short window of recent tokens, so each step costs two
small decodes regardless of output length. A delta that ends in an incomplete
UTF-8 sequence waits for the next token. While stop strings are configured the
last ``len(longest stop) - 1`` characters are held back, so a stop string is never
streamed and the final text ends right before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

_REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    """Anything that turns token ids into text."""

    def decode(self, token_ids: list[int]) -> str:
        """Text of the token ids."""
        ...


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas and detects stop strings."""

    def __init__(
        self, decoder: Decoder | None, stop: Sequence[str] = (), prior_token_ids: Sequence[int] = ()
    ) -> None:
        self._decoder = decoder
        self._stop = tuple(stop)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._ids: list[int] = list(prior_token_ids)
        self.text = decoder.decode(self._ids) if decoder is not None and self._ids else ""
        self._emitted = len(self.text)  # prior tokens were already streamed by whoever generated them
        self._prefix_offset = max(0, len(self._ids) - 6)
        self._read_offset = len(self._ids)
        self.stopped = False

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

    def delta(self, finished: bool) -> str:
        """Text not yet handed out; holds back a possible stop-string prefix unless ``finished``."""
        end = len(self.text) if finished or self.stopped else max(self._emitted, len(self.text) - self._hold)
        out = self.text[self._emitted : end]
        self._emitted = end
        return out

    def mark_emitted(self) -> None:
        """Treat all text so far as already handed out (it was streamed by another engine)."""
        self._emitted = len(self.text)
