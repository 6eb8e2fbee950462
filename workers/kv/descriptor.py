"""The one small type between the two sides of a KV transfer: the transfer descriptor.

The decode side reserves its destination, opens a receiver and gets a
``TransferDescriptor``; the prefill side opens a sender from it. The
descriptor holds plain fields only (no torch objects), so it travels as JSON
or as protobuf fields.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any

# dtype name -> bytes per element; the names are torch's without the "torch." prefix.
DTYPE_ITEMSIZE: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float64": 8,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
}


class TransportKind(str, enum.Enum):
    """Which transport moves the bytes."""

    MEMORY = "memory"  # in-process (tests, simulator)
    TCP = "tcp"
    SHM = "shm"  # same node, shared memory ring + control socket
    TORCH_DIST = "torch_dist"  # torch.distributed: gloo on CPU, NCCL on CUDA
    MOONCAKE = "mooncake"  # optional RDMA library
    NIXL = "nixl"  # optional RDMA library


class InvalidDescriptor(ValueError):
    """A transfer descriptor has a missing or out-of-range field; the message names it."""


@dataclass(frozen=True, slots=True)
class TransferDescriptor:
    """Where and what the prefill side sends for one request (created by the receiver)."""

    request_id: str
    kind: TransportKind
    address: str  # transport-specific: "host:port" for sockets, an endpoint id in-process
    num_tokens: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    device: str = "cpu"  # where the receiver's staging lives: "cpu" or "cuda"
    host_id: str = ""  # the receiving host's id (workers.kv.host: its boot id); "" when unknown

    def __post_init__(self) -> None:
        if not self.request_id:
            raise InvalidDescriptor("request_id must be non-empty")
        for name in ("num_tokens", "num_layers", "num_kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise InvalidDescriptor(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dtype not in DTYPE_ITEMSIZE:
            raise InvalidDescriptor(f"dtype {self.dtype!r} not supported; choose from {sorted(DTYPE_ITEMSIZE)}")
        if self.device not in ("cpu", "cuda"):
            raise InvalidDescriptor(f"device must be 'cpu' or 'cuda', got {self.device!r}")

    @property
    def itemsize(self) -> int:
        """Bytes per element of ``dtype``."""
        return DTYPE_ITEMSIZE[self.dtype]

    @property
    def tensor_nbytes(self) -> int:
        """Bytes of one layer's K (or V) tensor."""
        return self.num_tokens * self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def layer_nbytes(self) -> int:
        """Bytes sent per layer: K then V."""
        return 2 * self.tensor_nbytes

    @property
    def total_nbytes(self) -> int:
        """Bytes of the whole transfer."""
        return self.num_layers * self.layer_nbytes

    def to_dict(self) -> dict[str, str | int]:
        """Plain-field form (for JSON or protobuf)."""
        # not dataclasses.asdict: its deep copies cost ~40 us, paid on every transfer's HELLO
        values: dict[str, str | int] = {name: getattr(self, name) for name in self.__slots__}
        values["kind"] = self.kind.value
        return values

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> TransferDescriptor:
        """Parse the plain-field form; raises InvalidDescriptor naming a bad or missing field."""
        try:
            kind = TransportKind(fields["kind"])
        except KeyError:
            raise InvalidDescriptor("missing field 'kind'") from None
        except ValueError:
            raise InvalidDescriptor(
                f"unknown transport kind {fields['kind']!r}; choose from {[k.value for k in TransportKind]}"
            ) from None
        expected: dict[str, type] = {"request_id": str, "address": str, "dtype": str, "device": str, "host_id": str}
        expected |= {n: int for n in ("num_tokens", "num_layers", "num_kv_heads", "head_dim")}
        values: dict[str, Any] = {}
        for name, typ in expected.items():
            if name not in fields:
                if name in ("device", "host_id"):  # optional: their defaults hold
                    continue
                raise InvalidDescriptor(f"missing field {name!r}")
            if not isinstance(fields[name], typ) or isinstance(fields[name], bool):
                raise InvalidDescriptor(f"field {name!r} must be {typ.__name__}, got {fields[name]!r}")
            values[name] = fields[name]
        unknown = set(fields) - set(expected) - {"kind"}
        if unknown:
            raise InvalidDescriptor(f"unknown fields {sorted(unknown)}")
        return cls(kind=kind, **values)

    def to_json(self) -> str:
        """JSON form."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> TransferDescriptor:
        """Parse the JSON form."""
        try:
            fields = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidDescriptor(f"descriptor is not valid JSON: {exc}") from None
        if not isinstance(fields, dict):
            raise InvalidDescriptor("descriptor JSON must be an object")
        return cls.from_dict(fields)


@dataclass(frozen=True, slots=True)
class TransferStats:
    """What one side measured for one request's transfer."""

    request_id: str
    kind: TransportKind
    num_bytes: int
    num_layers: int
    seconds: float  # first layer handed over -> last layer verified (receiver) / acknowledged (sender)
    blocked_s: float = 0.0  # sender only: time send_layer() blocked the caller (back-pressure)
    wire_s: float = 0.0  # sender only: time the sending thread spent moving bytes (excludes waiting for layers)

    @property
    def gbps(self) -> float:
        """Throughput in GB/s (10^9 bytes per second)."""
        return self.num_bytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")

    @property
    def wire_gbps(self) -> float:
        """Throughput while bytes were moving (sender only), in GB/s."""
        return self.num_bytes / self.wire_s / 1e9 if self.wire_s > 0 else float("inf")

    @property
    def ms(self) -> float:
        """Duration in milliseconds."""
        return self.seconds * 1e3
