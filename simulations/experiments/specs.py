"""Turn command-line names into simulator inputs: latency specs, traces, cluster configs.

Latency spec grammar (``--latency``):

- ``roofline:GPU:MODEL`` — e.g. ``roofline:a100-80gb:llama-2-13b``; KV
  capacity per instance and KV bytes per token come from the GPU and model;
- ``profile:FILE`` / ``table:FILE`` — a profile written by ``pdserve
  profile`` (regression or interpolation); give ``--kv-blocks`` and
  ``--kv-bytes-per-token`` for its hardware. Serving overheads stored in
  the file (measured on a live deployment) are applied: per-step terms to
  the latency model, the per-request delay and the KV hand-off latency to
  the cluster;
- ``fixed:SECONDS`` — every non-empty step takes SECONDS; ``zero`` — free.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from orchestrator.core.slo import SLOTarget
from simulations.latency.base import LatencyModel
from simulations.latency.overhead import Overheads, with_step_overheads
from simulations.sim.cluster import LIVE_ROUTER_REFRESH_S, ClusterConfig, PoolSpec
from simulations.sim.instance import BatchPolicy
from simulations.sim.network import LinkConfig
from simulations.traces.trace import Trace

_DEFAULT_KV_BLOCKS = 4096


@dataclass(frozen=True)
class LatencySetup:
    """A latency model plus what sizing an instance needs from its hardware."""

    spec: str
    model: LatencyModel
    kv_bytes_per_token: float
    # KV tokens an instance of tp GPUs holds after weights (raises ValueError when the
    # weights do not fit); None: not derivable, use --kv-blocks.
    kv_tokens: Callable[[int], int] | None = None
    intra_node_gbps: float = 300.0
    overheads: Overheads = Overheads()  # request and hand-off terms; step terms are already in ``model``

    def kv_blocks(self, tp_degree: int, block_size: int, override: int | None = None) -> int:
        """KV blocks of an instance of ``tp_degree`` GPUs (``override`` wins)."""
        if override is not None:
            return override
        if self.kv_tokens is None:
            return _DEFAULT_KV_BLOCKS
        return max(1, self.kv_tokens(tp_degree) // block_size)

    def fits(self, tp_degree: int) -> bool:
        """Whether the model's weights fit on ``tp_degree`` GPUs."""
        if self.kv_tokens is None:
            return True
        try:
            self.kv_tokens(tp_degree)
        except ValueError:
            return False
        return True


def _profiled_kv_bytes_per_token(path: str) -> float:
    """The KV bytes per token a profile file records (``pdserve profile`` writes it); 0 (free transfers) if none."""
    from simulations.latency.profile import read_profile

    value = read_profile(path).metadata.get("kv_bytes_per_token")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0 else 0.0


def load_latency(spec: str, kv_bytes_per_token: float | None = None) -> LatencySetup:
    """Parse a ``--latency`` spec (see the module docstring); raises ValueError with the grammar."""
    kind, _, rest = spec.partition(":")
    if kind == "roofline":
        from simulations.latency.hardware import GPUS, MODELS, kv_capacity_tokens
        from simulations.latency.hardware import kv_bytes_per_token as kv_bytes
        from simulations.latency.roofline import RooflineLatency

        gpu_name, _, model_name = rest.partition(":")
        if not gpu_name or not model_name:
            raise ValueError(f"latency spec {spec!r}: expected roofline:GPU:MODEL, e.g. roofline:a100-80gb:llama-2-13b")
        roofline = RooflineLatency.named(model_name, gpu_name)
        model, gpu = MODELS[model_name], GPUS[gpu_name]

        def kv_tokens(tp_degree: int) -> int:
            return kv_capacity_tokens(model, gpu, tp_degree)

        return LatencySetup(spec, roofline, float(kv_bytes(model)), kv_tokens, gpu.link_bandwidth_gbps)
    if kind in ("profile", "table"):
        from simulations.latency.profile import load_overheads, load_profile, load_table

        if not rest:
            raise ValueError(f"latency spec {spec!r}: expected {kind}:FILE")
        model_p: LatencyModel = load_profile(rest) if kind == "profile" else load_table(rest)
        overheads = load_overheads(rest)
        if kv_bytes_per_token is None:
            kv_bytes_per_token = _profiled_kv_bytes_per_token(rest)
        return LatencySetup(spec, with_step_overheads(model_p, overheads), kv_bytes_per_token, overheads=overheads)
    if kind == "fixed":
        from simulations.latency.trivial import FixedLatency

        try:
            step_s = float(rest)
        except ValueError:
            raise ValueError(f"latency spec {spec!r}: expected fixed:SECONDS") from None
        return LatencySetup(spec, FixedLatency(step_s), kv_bytes_per_token or 0.0)
    if kind == "zero":
        from simulations.latency.trivial import ZeroLatency

        return LatencySetup(spec, ZeroLatency(), kv_bytes_per_token or 0.0)
    raise ValueError(
        f"unknown latency spec {spec!r}; use roofline:GPU:MODEL, profile:FILE, table:FILE, fixed:SECONDS or zero"
    )


def load_workload(name: str, limit: int | None = None, rate_scale: float = 1.0,
                  sample: int | None = None, seed: int = 0) -> Trace:
    """Load a trace by name or path, optionally subsample (seeded), cut to ``limit`` rows and rate-scale.

    Rows that never ran are left out: those the source marks failed (BurstGPT's zero-response rows)
    and prompts of zero tokens; simulated, they would count as fast successes. ``seed`` also seeds
    the generation of ServeGen traces. Raises ValueError for a bad count or when no request is left.
    """
    from simulations.traces import head, load_trace, sample_rows, scale_rate
    from simulations.traces.registry import TraceFormat, detect_format, resolve_trace_path
    from simulations.traces.transforms import take_rows

    if sample is not None and sample < 1:
        raise ValueError(f"--sample must be >= 1, got {sample}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    path = resolve_trace_path(name)
    fmt = detect_format(path) if path.exists() else None  # a missing path: load_trace says so
    trace = load_trace(name, format=fmt, **({"seed": seed} if fmt is TraceFormat.SERVEGEN else {}))
    ran = trace.prompt_tokens > 0
    if trace.failed is not None:
        ran &= ~trace.failed
    if not ran.all():
        trace = take_rows(trace, np.flatnonzero(ran))
    source = trace.name
    if sample is not None:
        trace = sample_rows(trace, num_requests=min(sample, len(trace)), seed=seed)
    if limit is not None and limit < len(trace):
        trace = head(trace, limit)
        if sample is not None:  # the name says how many sampled rows are simulated, not how many were drawn
            trace = take_rows(trace, slice(None), name=f"{source}~{len(trace)}")
    if len(trace) == 0:
        raise ValueError(f"trace {name!r} has no requests to simulate")
    if rate_scale != 1.0:
        trace = scale_rate(trace, rate_scale)
    return trace


@dataclass(frozen=True)
class Placement:
    """One candidate deployment: colocated (``colocated`` > 0) or ``prefill`` + ``decode``."""

    colocated: int = 0
    colocated_tp: int = 1
    prefill: int = 0
    prefill_tp: int = 1
    decode: int = 0
    decode_tp: int = 1

    @property
    def num_gpus(self) -> int:
        """GPUs this placement uses."""
        return self.colocated * self.colocated_tp + self.prefill * self.prefill_tp + self.decode * self.decode_tp

    @property
    def is_colocated(self) -> bool:
        """Whether this is the colocated baseline."""
        return self.colocated > 0

    @property
    def label(self) -> str:
        """E.g. ``4C(tp1)`` or ``2P(tp1)+1D(tp2)``."""
        if self.is_colocated:
            return f"{self.colocated}C(tp{self.colocated_tp})"
        return f"{self.prefill}P(tp{self.prefill_tp})+{self.decode}D(tp{self.decode_tp})"


@dataclass(frozen=True)
class ClusterKnobs:
    """Shared knobs of every cluster a command builds."""

    block_size: int = 16
    max_batched_tokens: int = 8192
    max_running_requests: int = 256
    colocated_policy: BatchPolicy = BatchPolicy.PREFILL_FIRST
    kv_blocks: int | None = None  # per instance; None: from the latency setup
    gpus_per_node: int = 8
    inter_node_gbps: float = 25.0
    intra_node_gbps: float | None = None  # None: the GPU's link bandwidth
    short_prompt_tokens: int = 32
    router_refresh_s: float = LIVE_ROUTER_REFRESH_S  # 0: the router sees every load change at once


def build_cluster(placement: Placement, latency: LatencySetup, knobs: ClusterKnobs,
                  timeline_bucket_s: float = 1.0) -> ClusterConfig:
    """A ``ClusterConfig`` for ``placement`` sized from ``latency``'s hardware."""
    from orchestrator.core.routing import RoutingConfig
    from orchestrator.core.types import Role

    def pool(role: Role, count: int, tp: int, policy: BatchPolicy) -> PoolSpec:
        return PoolSpec(role, count, tp, latency.kv_blocks(tp, knobs.block_size, knobs.kv_blocks), policy,
                        knobs.max_batched_tokens, knobs.max_running_requests)

    if placement.is_colocated:
        pools: tuple[PoolSpec, ...] = (
            pool(Role.COLOCATED, placement.colocated, placement.colocated_tp, knobs.colocated_policy),)
    else:
        if placement.prefill < 1 or placement.decode < 1:
            raise ValueError(f"a disaggregated placement needs >= 1 prefill and decode instance: {placement}")
        pools = (pool(Role.PREFILL, placement.prefill, placement.prefill_tp, BatchPolicy.PREFILL_FIRST),
                 pool(Role.DECODE, placement.decode, placement.decode_tp, BatchPolicy.PREFILL_FIRST))
    intra = knobs.intra_node_gbps if knobs.intra_node_gbps is not None else latency.intra_node_gbps
    return ClusterConfig(
        pools=pools, block_size=knobs.block_size, gpus_per_node=knobs.gpus_per_node,
        links=LinkConfig(intra_node_gbps=intra, inter_node_gbps=knobs.inter_node_gbps,
                         transfer_latency_s=latency.overheads.handoff_s),
        kv_bytes_per_token=latency.kv_bytes_per_token,
        request_overhead_s=latency.overheads.request_s,
        routing=RoutingConfig(short_prompt_tokens=knobs.short_prompt_tokens),
        timeline_bucket_s=timeline_bucket_s,
        router_refresh_s=knobs.router_refresh_s,
    )


def slo_target(ttft_s: float, tpot_s: float, attainment: float = 0.9) -> SLOTarget:
    """The SLO both commands check (validated by ``SLOTarget``)."""
    return SLOTarget(ttft_s=ttft_s, tpot_s=tpot_s, attainment=attainment)
