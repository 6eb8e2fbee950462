"""Plain data of the simulator: batching policies, instance specs, per-request state."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any

from orchestrator.core.types import InstanceHealth, InstanceLoad, RequestInfo, Role


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
        "info",
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
        self.info: RequestInfo | None = None  # what admission and routing see; built on first use

    def request_info(self) -> RequestInfo:
        """The ``RequestInfo`` admission and routing get (one object per request, however often it is retried)."""
        info = self.info
        if info is None:
            info = self.info = _INFO.build(self.idx, self.prompt_tokens, self.output_tokens, self.arrival_s)
        return info


# Fields of a load report that change while an instance runs; the rest are fixed by its spec.
_CHANGING = ("health", "queued_prefill_tokens", "waiting_requests", "running_requests", "free_kv_blocks")
# Filling the slots directly gives the object the constructor would, at a third of the cost (a
# report is built at most once per instance per arrival); only valid while construction does
# nothing but store the fields.
_FILL_SLOTS = (
    not hasattr(InstanceLoad, "__post_init__")
    and set(InstanceLoad.__slots__) == {f.name for f in fields(InstanceLoad)}
)


_INFO_ARGS = ("request_id", "prompt_tokens", "max_output_tokens", "arrival_s")  # the rest keep their defaults


class _RequestInfos:
    """Builds ``RequestInfo``s with the default SLO class and priority, by filling slots when valid."""

    __slots__ = ("_fill", "_set", "_defaults")

    def __init__(self) -> None:
        names = {f.name for f in fields(RequestInfo)}
        self._fill = not hasattr(RequestInfo, "__post_init__") and set(getattr(RequestInfo, "__slots__", ())) == names
        self._set: tuple[Callable[[RequestInfo, object], None], ...] = ()
        self._defaults: tuple[tuple[Callable[[RequestInfo, object], None], object], ...] = ()
        if self._fill:
            self._set = tuple(getattr(RequestInfo, n).__set__ for n in _INFO_ARGS)
            self._defaults = tuple((getattr(RequestInfo, f.name).__set__, f.default) for f in fields(RequestInfo)
                                   if f.name not in _INFO_ARGS)

    def build(self, idx: int, prompt_tokens: int, output_tokens: int, arrival_s: float) -> RequestInfo:
        """``RequestInfo(str(idx), prompt_tokens, output_tokens, arrival_s)``, a third of the cost."""
        if not self._fill:
            return RequestInfo(str(idx), prompt_tokens, output_tokens, arrival_s)
        info: RequestInfo = RequestInfo.__new__(RequestInfo)
        put_id, put_prompt, put_output, put_arrival = self._set
        put_id(info, str(idx))
        put_prompt(info, prompt_tokens)
        put_output(info, output_tokens)
        put_arrival(info, arrival_s)
        for put, value in self._defaults:
            put(info, value)
        return info


_INFO = _RequestInfos()


class LoadReports:
    """Builds one instance's ``InstanceLoad`` reports from a template holding its fixed fields."""

    __slots__ = ("_template", "_fixed", "_set")

    def __init__(self, template: InstanceLoad) -> None:
        self._template = template

        def setter(name: str) -> Callable[[InstanceLoad, object], None]:
            return getattr(InstanceLoad, name).__set__  # type: ignore[no-any-return]

        self._fixed = tuple((setter(n), getattr(template, n)) for n in InstanceLoad.__slots__ if n not in _CHANGING)
        self._set = tuple(setter(n) for n in _CHANGING)

    def build(self, health: InstanceHealth, queued_prefill_tokens: int, waiting_requests: int,
              running_requests: int, free_kv_blocks: int) -> InstanceLoad:
        """A report equal to the template with the changing fields replaced."""
        if not _FILL_SLOTS:
            return dataclasses.replace(
                self._template, health=health, queued_prefill_tokens=queued_prefill_tokens,
                waiting_requests=waiting_requests, running_requests=running_requests, free_kv_blocks=free_kv_blocks)
        load: InstanceLoad = InstanceLoad.__new__(InstanceLoad)
        for put, value in self._fixed:
            put(load, value)
        put_health, put_queued, put_waiting, put_running, put_free = self._set
        put_health(load, health)
        put_queued(load, queued_prefill_tokens)
        put_waiting(load, waiting_requests)
        put_running(load, running_requests)
        put_free(load, free_kv_blocks)
        return load
