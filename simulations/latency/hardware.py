"""GPU specs and model shapes for roofline estimates, plus KV-capacity helpers.

GPU numbers are dense (no 2:4 sparsity) BF16 tensor-core peaks, HBM/GDDR
bandwidth and capacity in decimal units (GB = 1e9 bytes) as NVIDIA's
datasheets state them:

| GPU | BF16 dense TFLOPS | memory GB/s | memory GB | link GB/s per direction | source |
|---|---|---|---|---|---|
| A100-80GB SXM | 312 | 2,039 | 80 | 300 (NVLink 3: 600 total) | NVIDIA A100 datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4) |
| H100 SXM | 989 | 3,350 | 80 | 450 (NVLink 4: 900 total) | NVIDIA H100 datasheet (1,979 TFLOPS is with sparsity) |
| H200 SXM | 989 | 4,800 | 141 | 450 (NVLink 4: 900 total) | NVIDIA H200 datasheet (1,979 TFLOPS is with sparsity) |
| L40S | 362 | 864 | 48 | 32 (PCIe Gen4 x16: 64 total) | NVIDIA L40S datasheet (733 TFLOPS is with sparsity; no NVLink) |

The datasheets quote bidirectional link totals; an all-reduce ring sends in
one direction per link, so the per-direction half is used. Model shapes
come from each model's published Hugging Face ``config.json``; parameter
counts are computed from the shapes (``ModelSpec.num_params``), which gives
6.74B / 13.0B / 69.0B / 8.03B for the Llama models.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """Peak numbers of one GPU."""

    name: str
    peak_tflops: float  # dense BF16/FP16 tensor-core TFLOPS
    memory_bandwidth_gbps: float  # GB/s
    memory_gb: float  # GB (1e9 bytes)
    link_bandwidth_gbps: float  # GB/s per direction between TP peers
    source: str

    @property
    def memory_bytes(self) -> float:
        """Device memory in bytes."""
        return self.memory_gb * 1e9


GPUS: dict[str, GpuSpec] = {
    g.name: g
    for g in (
        GpuSpec(
            "a100-80gb", 312.0, 2039.0, 80.0, 300.0, "NVIDIA A100 Tensor Core GPU datasheet (SXM 80GB column)"
        ),
        GpuSpec("h100", 989.0, 3350.0, 80.0, 450.0, "NVIDIA H100 Tensor Core GPU datasheet (SXM column)"),
        GpuSpec("h200", 989.0, 4800.0, 141.0, 450.0, "NVIDIA H200 Tensor Core GPU datasheet (SXM column)"),
        GpuSpec("l40s", 362.0, 864.0, 48.0, 32.0, "NVIDIA L40S datasheet (PCIe Gen4 x16, no NVLink)"),
    )
}


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Shape of a Llama-family decoder."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    dtype_bytes: int = 2  # bf16/fp16 weights and KV
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        """Per-head width."""
        return self.hidden_size // self.num_heads

    @property
    def layer_params(self) -> int:
        """Matmul weights of one decoder layer (q, k, v, o and the gated MLP)."""
        kv_width = self.num_kv_heads * self.head_dim
        attn = 2 * self.hidden_size * self.hidden_size + 2 * self.hidden_size * kv_width
        return attn + 3 * self.hidden_size * self.intermediate_size

    @property
    def num_params(self) -> int:
        """All weights: layers, norms, embeddings and the LM head."""
        embed = self.vocab_size * self.hidden_size
        norms = (2 * self.num_layers + 1) * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        return self.num_layers * self.layer_params + norms + embed + head

    @property
    def weight_bytes(self) -> int:
        """Bytes of all weights."""
        return self.num_params * self.dtype_bytes


MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        ModelSpec("llama-2-7b", 32, 4096, 32, 32, 11008, 32000),
        ModelSpec("llama-2-13b", 40, 5120, 40, 40, 13824, 32000),
        ModelSpec("llama-2-70b", 80, 8192, 64, 8, 28672, 32000),
        ModelSpec("llama-3-8b", 32, 4096, 32, 8, 14336, 128256),
        # workers/engine/tiny.py defaults; fp32 checkpoint
        ModelSpec("pdserve-tiny", 4, 256, 4, 2, 688, 32000, dtype_bytes=4),
    )
}


def kv_bytes_per_token(model: ModelSpec, kv_dtype_bytes: int | None = None) -> int:
    """KV-cache bytes one token occupies across all layers (keys and values)."""
    width = kv_dtype_bytes if kv_dtype_bytes is not None else model.dtype_bytes
    return 2 * model.num_layers * model.num_kv_heads * model.head_dim * width


def kv_capacity_tokens(
    model: ModelSpec,
    gpu: GpuSpec,
    tp_degree: int = 1,
    memory_fraction: float = 0.9,
    reserve_bytes: float = 0.0,
    kv_dtype_bytes: int | None = None,
) -> int:
    """KV tokens an instance of ``tp_degree`` GPUs holds after weights.

    ``memory_fraction`` of each GPU is usable (the rest: CUDA context,
    fragmentation); ``reserve_bytes`` per GPU is kept for activations. Weights
    and KV are both split evenly over the TP group. Raises ``ValueError``
    when the weights do not fit.
    """
    if tp_degree < 1:
        raise ValueError(f"tp_degree must be >= 1, got {tp_degree}")
    if not 0.0 < memory_fraction <= 1.0:
        raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
    usable = tp_degree * (gpu.memory_bytes * memory_fraction - reserve_bytes)
    free = usable - model.weight_bytes
    if free <= 0:
        raise ValueError(
            f"{model.name} weights ({model.weight_bytes / 1e9:.1f} GB) do not fit in "
            f"{tp_degree} x {gpu.name} ({usable / 1e9:.1f} GB usable)"
        )
    return int(free // kv_bytes_per_token(model, kv_dtype_bytes))
