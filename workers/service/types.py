"""Plain data the worker services exchange; protobuf stays inside ``convert.py``."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from orchestrator.core.types import Role
from workers.kv.descriptor import TransferDescriptor, TransferStats


class StreamFinish(str, Enum):
    """Why a worker's token stream ended."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


class GenerateMode(str, Enum):
    """Where a decode worker gets a request's prompt KV from."""

    AFTER_TRANSFER = "after_transfer"  # reserved by ReserveKV, pushed by a prefill worker
    LOCAL_PREFILL = "local_prefill"  # the decode worker prefills itself


@dataclass(frozen=True, slots=True)
class TokenChunk:
    """New tokens of one request from a worker; the last chunk has ``finish`` set."""

    token_ids: tuple[int, ...]
    text: str
    finish: StreamFinish | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # cumulative, including tokens generated before a resume


@dataclass(frozen=True, slots=True)
class PrefillResult:
    """What a prefill worker returns: the first token and what moving the KV cost."""

    first_token_id: int
    first_text: str
    transfer: TransferStats | None


@dataclass(frozen=True, slots=True)
class Reservation:
    """A decode worker's answer to ReserveKV."""

    descriptor: TransferDescriptor
    num_blocks: int


@dataclass(frozen=True, slots=True)
class WorkerEndpoint:
    """How to reach a worker: its identity, role, node and gRPC address."""

    instance_id: str
    role: Role
    node_id: str
    grpc_address: str  # "host:port"
    transport: str = "tcp"  # KV transport this worker receives or sends with
