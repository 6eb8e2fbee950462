"""Tensor-parallel scaling shared by the profiled models (regression and table).

A profile is measured at one GPU. At ``tp > 1`` the per-step fixed overhead
(launch, scheduling, sampling) is unchanged, the compute/memory part is split
across ``tp`` GPUs, and the all-reduces of each layer are added:

    t(tp) = overhead + work / tp + comm_fixed_s + comm_s_per_token * tokens * 2 (tp - 1) / tp

``2 (tp - 1) / tp`` is the share of a ring all-reduce's payload each GPU
sends. ``tokens`` is the number of tokens in the step (prefill tokens plus
one per decode). With both comm terms zero (the default) scaling is ideal;
``roofline.tp_scaling_for(model, gpu)`` derives them from a model and GPU.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TpScaling:
    """All-reduce cost terms added at tensor parallelism > 1."""

    comm_fixed_s: float = 0.0  # per step: latency of every all-reduce call (2 per layer)
    comm_s_per_token: float = 0.0  # per token: its activations' bytes over the link, all layers

    def __post_init__(self) -> None:
        if self.comm_fixed_s < 0 or self.comm_s_per_token < 0:
            raise ValueError("TP communication terms must be >= 0")

    def step_time_s(self, overhead_s: float, work_s: float, tokens: int, tp_degree: int) -> float:
        """Step time at ``tp_degree`` from its single-GPU overhead and work."""
        if tp_degree < 1:
            raise ValueError(f"tp_degree must be >= 1, got {tp_degree}")
        if tp_degree == 1:
            return overhead_s + work_s
        ring_share = 2.0 * (tp_degree - 1) / tp_degree
        comm_s = self.comm_fixed_s + self.comm_s_per_token * tokens * ring_share
        return overhead_s + work_s / tp_degree + comm_s
