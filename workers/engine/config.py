"""Model and engine configuration: parsed from ``config.json`` and validated where they enter.

``ModelConfig.from_dict`` accepts Hugging Face Llama/Qwen2 configs in both the older layout
(``rope_theta`` and ``rope_scaling`` at top level) and the newer one (``rope_parameters``).
Every failure is a ``ModelConfigError`` naming the file and the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

# The one place that lists the architectures the engine can run, with whether q/k/v carry a bias.
SUPPORTED_ARCHITECTURES: dict[str, bool] = {
    "LlamaForCausalLM": False,
    "Qwen2ForCausalLM": True,
}

_DTYPES = ("float32", "float16", "bfloat16")


class ModelConfigError(ValueError):
    """``config.json`` is missing, malformed or describes an unsupported model; the message names it."""


class UnsupportedArchitecture(ModelConfigError):
    """The checkpoint's architecture is not in ``SUPPORTED_ARCHITECTURES``."""


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """Llama-3 style frequency-dependent RoPE scaling (``rope_type == "llama3"``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The shape of a Llama-family decoder, as read from ``config.json``."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    tie_word_embeddings: bool
    qkv_bias: bool
    dtype_name: str  # checkpoint dtype: "float32", "float16" or "bfloat16"
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Validate a parsed ``config.json``; ``source`` names the file in error messages."""
        archs = raw.get("architectures")
        if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
            raise ModelConfigError(f"{source}: field 'architectures' must be a non-empty list of names")
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
            raise UnsupportedArchitecture(
                f"{source}: architecture '{arch}' is not supported (supported: {supported})"
            )

        def need_int(name: str, minimum: int = 1) -> int:
            value = raw.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ModelConfigError(
                    f"{source}: field '{name}' must be an integer >= {minimum}, got {value!r}"
                )
            return value

        _refuse_unsupported(raw, source)
        hidden = need_int("hidden_size")
        heads = need_int("num_attention_heads")
        kv_heads = need_int("num_key_value_heads") if raw.get("num_key_value_heads") is not None else heads
        if heads % kv_heads != 0:
            raise ModelConfigError(
                f"{source}: field 'num_key_value_heads' ({kv_heads!r}) must divide num_attention_heads ({heads})"
            )
        head_dim = need_int("head_dim") if raw.get("head_dim") is not None else hidden // heads
        if head_dim % 2 != 0 or head_dim < 2:
            raise ModelConfigError(f"{source}: field 'head_dim' must be an even integer >= 2, got {head_dim!r}")
        theta, scaling = _parse_rope(raw, source)
        dtype_name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
        if dtype_name not in _DTYPES:
            raise ModelConfigError(f"{source}: field 'dtype' must be one of {_DTYPES}, got {dtype_name!r}")
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        if any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in eos_ids):
            raise ModelConfigError(f"{source}: field 'eos_token_id' must be a token id or a list of them, got {eos!r}")
        bos = raw.get("bos_token_id")
        return cls(
            architecture=arch,
            vocab_size=need_int("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need_int("intermediate_size"),
            num_layers=need_int("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=need_int("max_position_embeddings"),
            rms_norm_eps=_positive_number(raw, "rms_norm_eps", 1e-6, source),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=SUPPORTED_ARCHITECTURES[arch] or bool(raw.get("attention_bias", False)),
            dtype_name=dtype_name,
            eos_token_ids=eos_ids,
            bos_token_id=bos if isinstance(bos, int) else None,
        )


def _positive_number(raw: dict[str, Any], name: str, default: float, source: str) -> float:
    """Field ``name`` of ``raw`` (``default`` when absent) as a float; ModelConfigError unless a finite number > 0."""
    value = raw.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
        raise ModelConfigError(f"{source}: field '{name}' must be a positive number, got {value!r}")
    return float(value)


def _refuse_unsupported(raw: dict[str, Any], source: str) -> None:
    """ModelConfigError for a field value the engine would silently ignore (MLP biases, an activation other than SiLU).

    Loading such a checkpoint would otherwise run without error and produce other tokens than its own.
    """
    if raw.get("mlp_bias") is True:
        raise ModelConfigError(f"{source}: field 'mlp_bias' = true is not supported (the MLP has no biases here)")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ModelConfigError(f"{source}: field 'hidden_act' = {act!r} is not supported (supported: 'silu')")


def _parse_rope(raw: dict[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    """Read RoPE base and scaling from either config layout."""
    params = raw.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ModelConfigError(f"{source}: field 'rope_parameters' must be an object")
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise ModelConfigError(f"{source}: field 'rope_theta' must be a positive number, got {theta!r}")
    scaling_raw = raw.get("rope_scaling") or params
    if not isinstance(scaling_raw, dict):
        raise ModelConfigError(f"{source}: field 'rope_scaling' must be an object or null, got {scaling_raw!r}")
    rope_type = scaling_raw.get("rope_type", scaling_raw.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise ModelConfigError(
            f"{source}: rope type '{rope_type}' is not supported (supported: default, llama3)"
        )
    try:
        scaling = RopeScaling(
            factor=float(scaling_raw["factor"]),
            low_freq_factor=float(scaling_raw["low_freq_factor"]),
            high_freq_factor=float(scaling_raw["high_freq_factor"]),
            original_max_position_embeddings=int(scaling_raw["original_max_position_embeddings"]),
        )
    except KeyError as exc:
        raise ModelConfigError(f"{source}: llama3 rope scaling lacks field {exc.args[0]!r}") from exc
    except (TypeError, ValueError) as exc:
        raise ModelConfigError(f"{source}: llama3 rope scaling has a field that is not a number: {exc}") from exc
    return float(theta), scaling


class EngineRole(str, Enum):
    """What a scheduler runs: everything, only prompts, or only decodes (plus recomputes)."""

    COLOCATED = "colocated"
    PREFILL_ONLY = "prefill_only"  # requests finish after their first token
    DECODE_ONLY = "decode_only"  # fresh prompts come prefilled; only recomputes run prompt chunks


class KVReads(str, Enum):
    """How attention reads a request's cached K/V."""

    AUTO = "auto"  # VIEWS on CPU, GATHER on CUDA
    # Read a context held in consecutive cache slots in place, one attention call per request; other
    # contexts are gathered. Best where copying costs more than a call (CPU).
    VIEWS = "views"
    # Copy every context's blocks into padded batches, one attention call per group of similar
    # lengths. Best where calls cost more than copies (CUDA).
    GATHER = "gather"


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Knobs of one engine instance; defaults suit the tiny CPU model."""

    device: str = "cpu"  # "cpu", "cuda" or "cuda:N"
    dtype: str | None = None  # compute dtype; None keeps the checkpoint's (fp32 on CPU for half checkpoints)
    block_size: int = 16  # tokens per KV block
    num_blocks: int | None = None  # KV blocks; None derives them from kv_cache_bytes
    kv_cache_bytes: int = 256 * 1024 * 1024  # KV budget used when num_blocks is None
    max_num_seqs: int = 64  # running sequences per step at most
    # Per-step token budget: decodes first, prefill chunks fill the rest. It bounds how long a step
    # with a prefill chunk makes colocated decodes wait (TPOT). On the tiny CPU model, 16 prompts of
    # 32-436 tokens: the longest step is ~50 ms at 512 and ~170 ms at 2048, while the whole batch
    # takes the same time within noise (larger chunks save a few steps but run less cache-friendly).
    # Raise it for offline throughput on large accelerators, where bigger chunks do pay.
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None  # context window; None uses max_position_embeddings
    role: EngineRole = EngineRole.COLOCATED
    seed: int = 0  # seeds the generator used by unseeded random sampling
    num_threads: int | None = 1  # torch intra-op threads on CPU; None leaves torch's setting
    kv_reads: KVReads = KVReads.AUTO  # how attention reads cached K/V (results are the same either way)
    # CPU, fp32: logits through the compiled panel kernel (workers.engine.lm_head) where it is built,
    # while torch runs one thread. It keeps a second, packed copy of the LM head (vocab x hidden x 4
    # bytes); the tiny model's batch of 16 mixed prompts ran 1.14-1.26x as fast with it.
    packed_lm_head: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"EngineConfig.block_size must be >= 1, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"EngineConfig.num_blocks must be >= 1, got {self.num_blocks}")
        if self.kv_cache_bytes < 1:
            raise ValueError(f"EngineConfig.kv_cache_bytes must be >= 1, got {self.kv_cache_bytes}")
        if self.max_num_seqs < 1:
            raise ValueError(f"EngineConfig.max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"EngineConfig.max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"EngineConfig.max_model_len must be >= 2, got {self.max_model_len}")
        if not isinstance(self.kv_reads, KVReads):
            raise ValueError(
                f"EngineConfig.kv_reads must be one of {[m.value for m in KVReads]}, got {self.kv_reads!r}"
            )
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise ValueError(f"EngineConfig.dtype must be one of {_DTYPES}, got {self.dtype!r}")
