"""Roofline latency model: a step costs the larger of its compute time and its memory time.

For one step of ``shape`` on ``tp`` GPUs (``hardware.GpuSpec``) running
``model`` (``hardware.ModelSpec``):

- FLOPs: ``2 * layer_params * layers`` per token in the step (prefill tokens
  plus one per decode); attention ``2 * hidden * layers * prefill_tokens_sq``
  for prefill (causal: half of QKᵀ plus AV) and ``4 * hidden * layers *
  decode_context_tokens`` for decode; the LM head ``2 * hidden * vocab`` per
  sequence that emits a token (only the last prompt position is projected).
- Bytes: all weights once per step, the KV read by decodes
  (``decode_context_tokens * kv_bytes_per_token``), and the KV written for
  every new token.
- ``t = overhead_s + max(FLOPs / (tp * peak * mfu), bytes / (tp * bw * mbu)) + comm``,
  with ``comm`` (tp > 1) = 2 all-reduces per layer of the step's activations
  over a ring: ``2 * layers * (allreduce_latency_s + tokens * hidden *
  dtype_bytes * 2 (tp - 1) / tp / link_bw)``.

Efficiency factors: ``mfu`` (model FLOPs utilization, default 0.5) and
``mbu`` (model bandwidth utilization, default 0.8) scale the datasheet peaks
to what kernels sustain; these defaults are typical of tuned serving stacks
(MFU 40-60% in large prefills, MBU 60-90% in decode) and should be
calibrated against a profile when one exists. ``allreduce_latency_s``
(default 10 µs per call) and ``overhead_s`` (default 0, per step) are
assumptions, not datasheet numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from simulations.latency.base import BatchShape
from simulations.latency.hardware import GPUS, MODELS, GpuSpec, ModelSpec, kv_bytes_per_token
from simulations.latency.tp import TpScaling


@dataclass(frozen=True, slots=True)
class RooflineLatency:
    """Step time = max(compute, memory) / efficiency + TP all-reduce; see the module docstring."""

    model: ModelSpec
    gpu: GpuSpec
    mfu: float = 0.5
    mbu: float = 0.8
    allreduce_latency_s: float = 10e-6
    overhead_s: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 < self.mfu <= 1.0 or not 0.0 < self.mbu <= 1.0:
            raise ValueError(f"mfu and mbu must be in (0, 1], got {self.mfu}, {self.mbu}")

    @classmethod
    def named(cls, model: str, gpu: str, **options: float) -> RooflineLatency:
        """Build from names in ``hardware.MODELS`` and ``hardware.GPUS``."""
        if model not in MODELS:
            raise ValueError(f"unknown model {model!r}; known: {', '.join(MODELS)}")
        if gpu not in GPUS:
            raise ValueError(f"unknown GPU {gpu!r}; known: {', '.join(GPUS)}")
        return cls(MODELS[model], GPUS[gpu], **options)

    def flops(self, shape: BatchShape) -> float:
        """FLOPs of one step (all GPUs together)."""
        m = self.model
        tokens = shape.prefill_tokens + shape.decode_requests
        dense = 2.0 * m.layer_params * m.num_layers * tokens
        attention = 2.0 * m.hidden_size * m.num_layers * shape.prefill_tokens_sq
        attention += 4.0 * m.hidden_size * m.num_layers * shape.decode_context_tokens
        head = 2.0 * m.hidden_size * m.vocab_size * (shape.prefill_requests + shape.decode_requests)
        return dense + attention + head

    def bytes_moved(self, shape: BatchShape) -> float:
        """HBM bytes of one step (all GPUs together)."""
        kv = kv_bytes_per_token(self.model)
        new_tokens = shape.prefill_tokens + shape.decode_requests
        return float(self.model.weight_bytes) + kv * (shape.decode_context_tokens + new_tokens)

    def comm_time_s(self, shape: BatchShape, tp_degree: int) -> float:
        """All-reduce time of one step at ``tp_degree`` (0 at 1)."""
        if tp_degree == 1:
            return 0.0
        return self.tp_scaling().step_time_s(
            0.0, 0.0, shape.prefill_tokens + shape.decode_requests, tp_degree
        )

    def tp_scaling(self) -> TpScaling:
        """The all-reduce terms of this model on this GPU, for profiled models (``TpScaling``)."""
        return tp_scaling_for(self.model, self.gpu, self.allreduce_latency_s)

    def step_time_s(self, shape: BatchShape, tp_degree: int = 1) -> float:
        """Seconds one step of ``shape`` takes with tensor parallelism ``tp_degree``."""
        if tp_degree < 1:
            raise ValueError(f"tp_degree must be >= 1, got {tp_degree}")
        if shape.is_empty:
            return 0.0
        compute_s = self.flops(shape) / (tp_degree * self.gpu.peak_tflops * 1e12 * self.mfu)
        memory_s = self.bytes_moved(shape) / (tp_degree * self.gpu.memory_bandwidth_gbps * 1e9 * self.mbu)
        return self.overhead_s + max(compute_s, memory_s) + self.comm_time_s(shape, tp_degree)


def tp_scaling_for(model: ModelSpec, gpu: GpuSpec, allreduce_latency_s: float = 10e-6) -> TpScaling:
    """All-reduce terms (2 per layer) of ``model`` on ``gpu``'s link, for ``TpScaling``."""
    calls = 2 * model.num_layers
    bytes_per_token = calls * model.hidden_size * model.dtype_bytes
    return TpScaling(
        comm_fixed_s=calls * allreduce_latency_s,
        comm_s_per_token=bytes_per_token / (gpu.link_bandwidth_gbps * 1e9),
    )
