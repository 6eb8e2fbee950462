"""The front end's ``PromptTokenizer`` over a Hugging Face ``tokenizers.Tokenizer``.

``encode(text, add_special_tokens=True)`` applies the tokenizer's own
post-processor (BOS where ``tokenizer.json`` asks for it), as Hugging Face
fast tokenizers do; chat prompts are encoded without it because the chat
template writes its special tokens itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` plus the chat template and bos/eos texts from its config."""

    def __init__(self, tokenizer: Any, chat_template: str | None, bos_token: str | None, eos_token: str | None):
        self._tokenizer = tokenizer
        self._chat_template = chat_template
        self._bos_token = bos_token
        self._eos_token = eos_token

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template, if the model has one."""
        return self._chat_template

    @property
    def bos_token(self) -> str | None:
        """Beginning-of-sequence token text."""
        return self._bos_token

    @property
    def eos_token(self) -> str | None:
        """End-of-sequence token text."""
        return self._eos_token

    @property
    def vocab_size(self) -> int:
        """Token ids this tokenizer can decode, added tokens included."""
        return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; releases the GIL while the Rust tokenizer runs."""
        # ``encode_batch`` lets other threads run meanwhile and ``encode`` does not, so a multi-MB
        # prompt tokenized in a worker thread would still stall the server's event loop.
        (encoding,) = self._tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)
        return list(encoding.ids)


def load_hf_tokenizer(model_dir: str | Path) -> HFTokenizer:
    """Load ``tokenizer.json`` and ``tokenizer_config.json`` of a model directory."""
    from workers.engine.loader import load_tokenizer

    info = load_tokenizer(model_dir)
    tok = info.tokenizer

    def text_of(token_id: int | None) -> str | None:
        return None if token_id is None else tok.id_to_token(token_id)

    eos_id = info.eos_token_ids[0] if info.eos_token_ids else None
    return HFTokenizer(tok, info.chat_template, text_of(info.bos_token_id), text_of(eos_id))
