"""Plain data of the simulator: batching policies, instance specs, per-request state."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from orchestrator.core.types import Role


class BatchPolicy(str, Enum):
    """How an instance mixes prefill and decode work in a step."""

    PREFILL_FIRST = "prefill_first"
    CHUNKED = "chunked"


@dataclass(frozen=True, slots=True)
class InstanceSpec:
    """Static description of one instance; GPUs used = ``tp_degree``."""

    instance_id: str
    role: Role
    kv_blocks: int  # KV cache capacity in blocks of block_size tokens
    tp_degree: int = 1
    node_id: str = "node-0"
    block_size: int = 16
    max_running_requests: int = 256  # running decodes (and new prompts per prefill step)
    max_batched_tokens: int = 8192  # per-step token budget (a longer prompt runs alone)
    policy: BatchPolicy = BatchPolicy.PREFILL_FIRST

    def __post_init__(self) -> None:
        if self.kv_blocks < 1 or self.block_size < 1 or self.tp_degree < 1:
            raise ValueError(f"instance {self.instance_id}: kv_blocks, block_size and tp_degree must be >= 1")
        if self.max_running_requests < 1 or self.max_batched_tokens < 1:
            raise ValueError(f"instance {self.instance_id}: batch limits must be >= 1")


class SimRequest:
    """Mutable per-request state while a request is inside the cluster."""

    __slots__ = (
        "idx", "prompt_tokens", "output_tokens", "arrival_s", "generated", "prefill_target",
        "prefill_done", "reserved_blocks", "offset", "end_step", "last_token_s", "decode_to", "prefill_from",
    )

    def __init__(self, idx: int, prompt_tokens: int, output_tokens: int, arrival_s: float) -> None:
        self.idx = idx
        self.prompt_tokens = prompt_tokens
        self.output_tokens = output_tokens
        self.arrival_s = arrival_s
        self.generated = 0  # tokens produced so far (first token included)
        self.prefill_target = prompt_tokens  # tokens the next prefill must compute
        self.prefill_done = 0
        self.reserved_blocks = 0  # blocks held while not running
        self.offset = 0
        self.end_step = 0
        self.last_token_s = 0.0
        self.decode_to: Any = None  # decode Instance after a disaggregated prefill
        self.prefill_from: Any = None  # prefill Instance holding the KV until the transfer ends
