"""What the commands' --help texts promise, checked against what the commands do."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from workers.commands import generate
from workers.engine.loader import load_tokenizer


def test_generate_help_states_the_default_prompt_lengths(tiny_model_dir: Path) -> None:
    parser = argparse.ArgumentParser()
    generate.add_arguments(parser)
    (prompt_help,) = [a.help for a in parser._actions if "--prompt" in a.option_strings]
    assert prompt_help is not None
    match = re.search(r"three prompts of (\d+), (\d+) and (\d+) tokens", prompt_help)
    assert match is not None, prompt_help
    tokenizer = load_tokenizer(tiny_model_dir)
    counted = [len(tokenizer.encode(text)) for text in generate.DEFAULT_PROMPTS]  # as generate encodes them
    assert [int(n) for n in match.groups()] == counted
