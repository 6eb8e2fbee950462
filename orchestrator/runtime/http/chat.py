"""Chat messages to prompt text: the model's Jinja chat template, or pdserve's default.

The template comes from the tokenizer's ``chat_template`` (``tokenizer_config.json``)
and is rendered in a sandboxed Jinja environment with the variables Hugging
Face templates expect: ``messages`` (dicts with ``role`` and ``content``),
``add_generation_prompt``, ``bos_token``, ``eos_token`` and
``raise_exception``. Models without a template use ``DEFAULT_CHAT_TEMPLATE``:

    <bos><|system|>\\n{content}<eos>\\n<|user|>\\n{content}<eos>\\n<|assistant|>\\n

The rendered text already holds the special tokens it wants, so it is
tokenized without adding more.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any, NoReturn

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class ChatTemplateError(ValueError):
    """The chat template failed to render these messages; the message says why."""


def _raise_exception(message: str) -> NoReturn:
    raise ChatTemplateError(message)


@lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(template)


def render_chat(
    messages: Sequence[dict[str, str]],
    template: str | None,
    bos_token: str | None,
    eos_token: str | None,
    add_generation_prompt: bool = True,
) -> str:
    """Render ``messages`` with ``template`` (or the default) to the prompt text."""
    try:
        compiled = _compile(template if template else DEFAULT_CHAT_TEMPLATE)
        return str(
            compiled.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=bos_token or "",
                eos_token=eos_token or "",
            )
        )
    except ChatTemplateError:
        raise
    except TemplateError as exc:
        raise ChatTemplateError(f"chat template failed: {exc}") from exc
