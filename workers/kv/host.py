"""Which host a KV endpoint runs on, as descriptors carry it (``TransferDescriptor.host_id``).

The kernel's boot id is the same for every process and every container of
one host and differs between hosts (and between boots), so a sender can
tell that a receiver shares its kernel even when each side has a network
address of its own (two pods of one Kubernetes node).
"""

from __future__ import annotations

import functools
from pathlib import Path

_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


@functools.cache
def local_host_id() -> str:
    """This host's boot id; "" where the kernel does not expose one (not Linux)."""
    try:
        return _BOOT_ID.read_text().strip()
    except OSError:
        return ""
