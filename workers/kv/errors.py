"""Errors of the KV-cache transports; every failure names the request (and layer when known)."""

from __future__ import annotations

import enum


class KVTransferError(RuntimeError):
    """A KV transfer failed: the peer went away, broke protocol, or the receiver rejected a layer."""


class KVTransferTimeout(KVTransferError):
    """A KV transfer made no progress within its deadline."""


class KVPeerError(KVTransferError):
    """The other end of the transfer went away, stalled, broke the protocol or refused the transfer.

    Either side raises it about the other; it is what lets a router tell a dead receiver from a bad sender.
    """


class KVRejected(KVPeerError):
    """The receiver answered this transfer with an error (it refused it, or a layer failed there)."""


class KVPeerTimeout(KVPeerError, KVTransferTimeout):
    """The other end stopped answering (connecting, reading or sending) within its deadline."""


class KVChecksumError(KVTransferError):
    """A received layer's checksum does not match the one the sender computed."""

    def __init__(self, request_id: str, layer_idx: int, detail: str) -> None:
        super().__init__(f"request {request_id!r} layer {layer_idx}: checksum mismatch ({detail})")
        self.request_id = request_id
        self.layer_idx = layer_idx


class KVBackendUnavailable(KVTransferError):
    """The chosen transport backend is not installed or not usable on this machine."""


class TransferFault(enum.Enum):
    """Which side of a failed KV transfer its error points at."""

    SENDER = "sender"  # the bytes went bad on the sending side (checksum mismatch)
    RECEIVER = "receiver"  # the receiver refused, went silent or vanished: the sender is fine
    UNKNOWN = "unknown"  # e.g. the sender gave up on its own timer: blame neither


def sending_side_fault(exc: BaseException) -> TransferFault:
    """The side an error raised while *sending* a transfer points at (the sender's peer is the receiver)."""
    if isinstance(exc, KVChecksumError):  # reported by the receiver, but about the bytes the sender put out
        return TransferFault.SENDER
    if isinstance(exc, KVPeerError):
        return TransferFault.RECEIVER
    return TransferFault.UNKNOWN


# how to install the optional NIXL backend (its `nixl` wrapper declares dependencies that conflict)
NIXL_INSTALL = "pip install nixl-cu12 && pip install --no-deps nixl"
