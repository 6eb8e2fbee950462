"""A tiny random-weight Llama checkpoint, written in Hugging Face layout without transformers.

``create_tiny_model`` writes ``config.json``, ``model.safetensors`` (HF tensor names),
``tokenizer.json`` (a byte-level BPE trained with ``tokenizers`` on a bundled English
text plus deterministic pseudo-words) and ``tokenizer_config.json`` with a chat
template. ``ensure_tiny_model`` creates it once in a cache directory; concurrent
callers race safely because each writes a private temporary directory and renames it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

if TYPE_CHECKING:
    from tokenizers import Tokenizer

TINY_MODEL_DIRNAME = "tiny-llama"
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_BUNDLED_TEXT = """\
pdserve splits the work of serving a language model in two. A prefill worker reads the whole
prompt at once and computes its keys and values; a decode worker then produces the answer one
token at a time. The two phases want different hardware: prefill is bound by arithmetic, decode
by memory bandwidth. Keeping them apart lets each pool be sized for its own load, and it keeps a
long prompt from stalling the tokens of everyone else who is waiting for a reply.
The key-value cache is stored in fixed-size blocks. Each request owns a table of block numbers,
blocks return to a free list when the request ends, and when memory runs short a request can be
preempted and recomputed later. A scheduler forms batches continuously: decodes first, then
chunks of prompts fill the rest of the token budget of each step.
Hello! How are you today? I would like to know the weather in Paris, the time in Tokyo, and the
price of a cup of coffee in New York. Please write a short poem about the sea, a list of three
fruits, and the numbers from one to twenty: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20.
"""


def _training_corpus(seed: int, num_words: int) -> list[str]:
    """Bundled text plus seeded pseudo-words, so the BPE reaches a Llama-sized vocabulary quickly."""
    rng = random.Random(seed)
    consonants, vowels = "bcdfghjklmnprstvwz", "aeiou"
    syllables = [c + v for c in consonants for v in vowels]
    syllables += [s + e for s in syllables for e in "nrst"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(num_words)]
    lines = [" ".join(words[i : i + 20]) for i in range(0, num_words, 20)]
    return _BUNDLED_TEXT.splitlines() * 20 + lines


def build_tokenizer(vocab_size: int = 32000, seed: int = 0) -> Tokenizer:
    """Train a deterministic byte-level BPE ``tokenizers.Tokenizer`` with the tiny model's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_corpus(seed, num_words=60000), trainer)
    return tok


def write_tokenizer_files(directory: Path, tokenizer: Tokenizer) -> None:
    """Write ``tokenizer.json`` and a ``tokenizer_config.json`` with eos/bos and the chat template."""
    tokenizer.save(str(directory / "tokenizer.json"))
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": False,
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))


def tiny_config(
    vocab_size: int,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 688,
    max_position_embeddings: int = 4096,
    tie_word_embeddings: bool = False,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
) -> dict[str, Any]:
    """The ``config.json`` contents of a tiny Llama."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": hidden_size // num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def random_llama_weights(config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Random Llama weights under Hugging Face names (std 0.02 projections, unit norms)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = int(config["hidden_size"])
    inter = int(config["intermediate_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config["num_key_value_heads"])
    head_dim = int(config["head_dim"])
    vocab = int(config["vocab_size"])

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.02

    weights = {"model.embed_tokens.weight": normal(vocab, hidden), "model.norm.weight": torch.ones(hidden)}
    for i in range(int(config["num_hidden_layers"])):
        p = f"model.layers.{i}."
        weights[p + "self_attn.q_proj.weight"] = normal(heads * head_dim, hidden)
        weights[p + "self_attn.k_proj.weight"] = normal(kv_heads * head_dim, hidden)
        weights[p + "self_attn.v_proj.weight"] = normal(kv_heads * head_dim, hidden)
        weights[p + "self_attn.o_proj.weight"] = normal(hidden, heads * head_dim)
        weights[p + "mlp.gate_proj.weight"] = normal(inter, hidden)
        weights[p + "mlp.up_proj.weight"] = normal(inter, hidden)
        weights[p + "mlp.down_proj.weight"] = normal(hidden, inter)
        weights[p + "input_layernorm.weight"] = torch.ones(hidden)
        weights[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
    if not config["tie_word_embeddings"]:
        weights["lm_head.weight"] = normal(vocab, hidden)
    return weights


def create_tiny_model(
    directory: str | Path,
    seed: int = 0,
    vocab_size: int = 32000,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 688,
    max_position_embeddings: int = 4096,
    tie_word_embeddings: bool = False,
) -> Path:
    """Write a random-weight fp32 Llama with tokenizer into ``directory`` and return its path."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size=vocab_size, seed=seed)
    special: dict[str, int] = {}
    for name in SPECIAL_TOKENS:
        token_id = tokenizer.token_to_id(name)
        if token_id is None:  # the trainer always adds them; guard against a tokenizers change
            raise RuntimeError(f"tokenizer training lost special token {name!r}")
        special[name] = token_id
    config = tiny_config(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=special["<s>"],
        eos_token_id=special["</s>"],
    )
    save_file(random_llama_weights(config, seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": special["<s>"], "eos_token_id": special["</s>"]}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    write_tokenizer_files(out, tokenizer)
    return out


def default_cache_dir() -> Path:
    """``$PDSERVE_CACHE`` if set, else ``~/.cache/pdserve``."""
    env = os.environ.get("PDSERVE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "pdserve"


def ensure_tiny_model(cache_dir: str | Path | None = None) -> Path:
    """Return ``<cache_dir>/tiny-llama``, creating it once; safe when several processes race."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / TINY_MODEL_DIRNAME
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-llama-", dir=root))
    try:
        create_tiny_model(staging)
        try:
            os.rename(staging, final)  # atomic; fails if another process got there first
        except OSError:
            if not (final / "config.json").is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final
