"""Errors of the KV-cache transports; every failure names the request (and layer when known)."""

from __future__ import annotations


class KVTransferError(RuntimeError):
    """A KV transfer failed: the peer went away, broke protocol, or the receiver rejected a layer."""


class KVTransferTimeout(KVTransferError):
    """A KV transfer made no progress within its deadline."""


class KVChecksumError(KVTransferError):
    """A received layer's checksum does not match the one the sender computed."""

    def __init__(self, request_id: str, layer_idx: int, detail: str) -> None:
        super().__init__(f"request {request_id!r} layer {layer_idx}: checksum mismatch ({detail})")
        self.request_id = request_id
        self.layer_idx = layer_idx


class KVBackendUnavailable(KVTransferError):
    """The chosen transport backend is not installed or not usable on this machine."""


# how to install the optional NIXL backend (its `nixl` wrapper declares dependencies that conflict)
NIXL_INSTALL = "pip install nixl-cu12 && pip install --no-deps nixl"
