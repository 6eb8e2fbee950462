"""TCP congestion control of a KV data connection (``SenderOptions.tcp_congestion``).

A pacing algorithm such as BBR (the default of many hosts, this one included)
spaces a sender's segments with a timer at the rate it has estimated. Between
two processes of one host there is no network to protect, and the estimate
follows the sender's own pauses (the checksum it computes between layers): on
loopback, with the rest unchanged, a 16 MB tcp transfer took 1.4-1.6x as long
and 1.4-1.6x the sender's CPU under BBR as under reno (two runs, 20 rounds
each). ``auto`` therefore picks reno, which every Linux host allows every
user, for a connection to a receiver on this host: its descriptor names this
host (workers.kv.host; two pods of one node share it, though each has an
address of its own), or its address is a loopback address or this end's own.
Any other connection keeps the host's setting.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

from workers.kv.errors import KVTransferError
from workers.kv.host import local_host_id

AUTO = "auto"  # reno on same-host connections, the host's default elsewhere
SYSTEM = "system"  # always the host's default (net.ipv4.tcp_congestion_control)
SAME_HOST_ALGORITHM = "reno"
# what the kernel lets an unprivileged socket use, and what it has loaded (a CAP_NET_ADMIN process may use those)
ALLOWED = Path("/proc/sys/net/ipv4/tcp_allowed_congestion_control")
AVAILABLE = Path("/proc/sys/net/ipv4/tcp_available_congestion_control")


def same_host(sock: socket.socket, peer_host_id: str = "") -> bool:
    """Whether a connected socket's peer is on this host: its host id is ours, or its address is loopback or ours."""
    if peer_host_id and peer_host_id == local_host_id():
        return True
    try:
        local, peer = sock.getsockname()[0], sock.getpeername()[0]
    except OSError:  # the peer is already gone: the first send will say so
        return False
    return bool(local == peer or ipaddress.ip_address(peer).is_loopback)


def chosen_algorithm(sock: socket.socket, choice: str, peer_host_id: str = "") -> str | None:
    """The algorithm ``choice`` means for this connected socket; None keeps the host's default."""
    if choice == SYSTEM:
        return None
    if choice == AUTO:
        return SAME_HOST_ALGORITHM if same_host(sock, peer_host_id) else None
    return choice


def apply_congestion_control(sock: socket.socket, choice: str, peer_host_id: str = "") -> str | None:
    """Set the connection's algorithm as ``choice`` says; return the one set (None: the host's default).

    ``peer_host_id``: the receiver's host id, from its descriptor ("" unknown).

    An algorithm named explicitly that the kernel refuses is a KVTransferError that lists what
    this host allows; under ``auto`` a refusal (no such socket option off Linux) keeps the default.
    """
    name = chosen_algorithm(sock, choice, peer_host_id)
    option = getattr(socket, "TCP_CONGESTION", None)
    if name is None or (option is None and choice == AUTO):
        return None
    try:
        if option is None:
            raise OSError("this platform has no TCP_CONGESTION socket option")
        sock.setsockopt(socket.IPPROTO_TCP, option, name.encode())
    except OSError as exc:
        if choice == AUTO:
            return None
        raise KVTransferError(
            f"tcp_congestion={name!r} refused ({exc.strerror or exc}); this host allows "
            f"{_read(ALLOWED)!r} to every user and has {_read(AVAILABLE)!r} loaded"
        ) from None
    return name


def validate_choice(choice: str) -> None:
    """ValueError unless ``choice`` is ``auto``, ``system`` or a plausible algorithm name."""
    if not choice or not choice.replace("_", "").isalnum() or len(choice) > 15:  # TCP_CA_NAME_MAX is 16
        raise ValueError(
            f"tcp_congestion must be {AUTO!r}, {SYSTEM!r} or an algorithm name such as 'reno' or 'cubic', "
            f"got {choice!r}"
        )


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return "unknown"


def refusal(name: str, allowed: tuple[str, ...] | None, available: tuple[str, ...] | None, privileged: bool) -> str | None:
    """Why algorithm ``name`` cannot be set on sockets given the host's lists (None: it can, or they are unknown)."""
    if allowed is None:
        return None
    usable = set(allowed) | (set(available or ()) if privileged else set())
    if name in usable:
        return None
    return (f"{name!r} is not allowed on this host; use {AUTO}, {SYSTEM} or one of: "
            f"{', '.join(sorted(usable))} (net.ipv4.tcp_allowed_congestion_control)")


def host_refusal(name: str) -> str | None:
    """``refusal`` against this host's /proc lists and this process's privileges."""
    privileged = hasattr(os, "geteuid") and os.geteuid() == 0
    return refusal(name, _names(ALLOWED), _names(AVAILABLE), privileged)


def _names(path: Path) -> tuple[str, ...] | None:
    try:
        return tuple(path.read_text().split())
    except OSError:  # not Linux, or /proc hidden: nothing to check against
        return None
