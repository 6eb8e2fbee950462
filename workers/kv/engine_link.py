"""Glue between the engine's disaggregation API and a KV transport, for both sides of one request.

Decode side: ``expect_into_engine`` reserves the blocks (the destination is
allocated before anything is sent) and opens a receiver whose callback
scatters each verified layer into them. Prefill side: ``prefill_and_send``
runs the prompt with the sender's ``send_layer`` as the per-layer hook, so
layer i travels while layer i+1 computes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from workers.kv.descriptor import TransferStats
from workers.kv.interface import KVEndpoint, KVReceiver, KVSender, KVSpec
from workers.kv.pipeline import dtype_name

if TYPE_CHECKING:
    from workers.engine.engine import LLMEngine
    from workers.engine.kv_layout import KVLayout
    from workers.engine.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class PrefillSent:
    """Outcome of ``prefill_and_send``."""

    first_token_id: int
    stats: TransferStats
    tail_s: float  # prompt computed -> receiver acknowledged the last layer: the transfer on the critical path


def kv_spec(layout: KVLayout) -> KVSpec:
    """The transport's per-layer shape from the engine's KV layout."""
    return KVSpec(layout.num_layers, layout.num_kv_heads, layout.head_dim, dtype_name(layout.dtype))


def expect_into_engine(engine: LLMEngine, endpoint: KVEndpoint, request_id: str, num_tokens: int) -> KVReceiver:
    """Reserve ``num_tokens`` of KV in ``engine`` and open a receiver that writes into them."""
    engine.reserve(request_id, num_tokens)

    def on_layer(layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        engine.write_layer_kv(request_id, layer_idx, k, v)

    try:
        return endpoint.expect(request_id, num_tokens, kv_spec(engine.kv_layout), on_layer)
    except BaseException:
        engine.release(request_id)
        raise


def prefill_and_send(
    engine: LLMEngine,
    sender: KVSender,
    request_id: str,
    prompt_token_ids: Sequence[int],
    sampling: SamplingParams,
    overlap: bool = True,
) -> PrefillSent:
    """Prefill and ship the KV; return the first token, the sender's stats and the transfer tail.

    ``overlap=False`` holds every layer until the prompt is done and sends them
    afterwards (the baseline that layer-wise sending improves on).
    """
    held: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    hook = sender.send_layer if overlap else (lambda i, k, v: held.append((i, k, v)))
    try:
        first = engine.prefill(request_id, prompt_token_ids, sampling, on_layer_kv=hook)
        computed_at = time.perf_counter()
        for layer_idx, k, v in held:
            sender.send_layer(layer_idx, k, v)
        stats = sender.finish()
    except BaseException:
        sender.abort()
        raise
    return PrefillSent(first, stats, time.perf_counter() - computed_at)
