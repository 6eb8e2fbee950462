"""The two-rank process groups that torch_dist pairs run on: which backend, how they are built and torn
down, and their operations' errors as KV transfer errors.

Which backend a pair uses is the receiver's choice, made at PAIR from both
sides' GPUs (``pair_device``): NCCL between two different GPUs when the
receiver's staging is on CUDA, gloo through host memory otherwise. NCCL
refuses two ranks on one physical GPU ("Duplicate GPU detected"), so two
workers sharing a GPU (fractional GPUs, a one-GPU box) pair over gloo, as
does a sender without CUDA. NCCL pairs wait blocking
(``TORCH_NCCL_BLOCKING_WAIT``): a lost peer is then an error of that pair
within its timeout, where NCCL's default (``work.wait()`` only orders the
CUDA stream, and the watchdog tears the process down at the timeout) would
take every request of the worker with it.
"""

from __future__ import annotations

import datetime
import os
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from workers.kv.errors import KVPeerError, KVPeerTimeout, KVTransferError
from workers.kv.host import local_host_id

# Read when a NCCL group is built, so it is set before any is (see the module docstring).
os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")

_TIMED_OUT = re.compile(r"time(d)?[ _-]?out", re.IGNORECASE)
_NCCL_SPIN_S = 0.05  # how long wait_op polls an NCCL op before it waits blocking


def make_group(store: Any, pair_id: str, rank: int, device: str, timeout_s: float) -> Any:
    """A 2-rank process group for one pair, without touching the default (global) group."""
    prefixed = dist.PrefixStore(f"pdserve-kv/{pair_id}", store)
    timeout = datetime.timedelta(seconds=timeout_s)
    if device == "cuda":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(prefixed, rank, 2, options)
    return dist.ProcessGroupGloo(prefixed, rank, 2, timeout)


def join_group(host: str, port: int, pair_id: str, rank: int, device: str, timeout_s: float, wait_s: float) -> Any:
    """The connecting side's group of a pair, through the receiver's store at ``host:port``, within ``wait_s``.

    The store client's handshake has no timeout of its own: a receiver frozen (stopped, partitioned)
    right after it answered PAIR held the caller for as long as it stayed frozen. The group is built
    on a thread of its own; past ``wait_s`` this raises KVPeerTimeout, and a group the thread
    completes after that is torn down there. Torch's errors come out as KV peer errors.
    """
    outcome: list[Any] = []
    lock = threading.Lock()
    given_up = False

    def build() -> None:
        try:
            store = dist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))
            result: Any = make_group(store, pair_id, rank, device, timeout_s)
        except BaseException as exc:  # handed to the caller
            result = exc
        with lock:
            late = given_up
            outcome.append(result)
            done.set()
        if late and not isinstance(result, BaseException):
            release_group(result, device)

    done = threading.Event()
    threading.Thread(target=build, name="kv-pair-join", daemon=True).start()
    if not done.wait(max(0.0, wait_s)):
        with lock:
            given_up = not done.is_set()
        if given_up:
            raise KVPeerTimeout(f"forming a pair with {host}:{port}: no group after {wait_s:.1f}s")
    result = outcome[0]
    if isinstance(result, RuntimeError):  # torch's DistNetworkError and its kin: the store or the peer
        raise _group_error(result, f"forming a pair with {host}:{port}")
    if isinstance(result, BaseException):
        raise result
    return result


def gpu_identity(device: str = "cuda") -> str:
    """The GPU ``device`` names ("cuda": the current one) as NCCL tells GPUs apart; "" for none, or without NCCL.

    NCCL refuses two ranks with the same host and PCI bus id: MIG slices of one GPU share it, though
    their UUIDs differ. Where torch does not expose the bus id, the UUID stands in (a MIG pair then
    fails at its first NCCL op, and its connector pairs over gloo from then on).
    """
    if not device.startswith("cuda") or not (torch.cuda.is_available() and dist.is_nccl_available()):
        return ""
    index = torch.device(device).index
    props = torch.cuda.get_device_properties(torch.cuda.current_device() if index is None else index)
    bus = getattr(props, "pci_bus_id", None)
    if bus is None:
        return f"{local_host_id()}/uuid-{props.uuid}"
    return f"{local_host_id()}/pci-{getattr(props, 'pci_domain_id', 0):x}:{bus:x}:{getattr(props, 'pci_device_id', 0):x}"


def pair_device(receiver_device: str, receiver_gpu: str, sender_gpu: str) -> str:
    """The device a pair moves KV through: "cuda" (NCCL) only between two different GPUs, else "cpu" (gloo)."""
    if not receiver_device.startswith("cuda") or not receiver_gpu or not sender_gpu or receiver_gpu == sender_gpu:
        return "cpu"
    return "cuda"


def release_group(group: Any, device: str) -> None:
    """Tear down a pair's NCCL communicator now (its buffers, stream and watchdog): a gloo group needs nothing.

    Left to the garbage collector, a NCCL group is destroyed without a shutdown, which torch warns
    about and which may block the thread that drops it while an operation is still posted.
    """
    if device != "cuda":
        return
    try:
        group.abort()
    except RuntimeError:  # already torn down by its own error handling
        pass


def _group_error(exc: RuntimeError, what: str) -> KVTransferError:
    """A gloo/NCCL RuntimeError as a KVPeerError, or KVPeerTimeout, naming ``what``.

    A pair's group has one other rank, so its errors (the peer's connection lost, its ops never
    posted) are about the peer.
    """
    cls = KVPeerTimeout if _TIMED_OUT.search(str(exc)) else KVPeerError  # gloo: "Timed out waiting 1000ms"
    return cls(f"{what}: {exc}")


def post_op(op: Callable[[list[torch.Tensor], int, int], Any], tensor: torch.Tensor, peer: int, what: str) -> Any:
    """Post ``group.send`` or ``group.recv`` of ``tensor``: a group whose peer is gone refuses at once, not at wait."""
    try:
        return op([tensor], peer, 0)
    except RuntimeError as exc:
        raise _group_error(exc, what) from None


def wait_op(work: Any, what: str, device: str = "cpu") -> None:
    """Wait for a posted op of a pair's group (``device``: the pair's); its errors as ``post_op``'s."""
    try:
        if device == "cuda":
            # A blocking NCCL wait polls its op every millisecond (ten in older torch), a long time for a
            # layer in flight: poll it here first, without sleeping; wait() then returns at once, or raises.
            deadline = time.perf_counter() + _NCCL_SPIN_S
            while not work.is_completed() and time.perf_counter() < deadline:
                os.sched_yield()
        work.wait()
    except RuntimeError as exc:  # gloo/NCCL report peer loss and timeouts as RuntimeError
        raise _group_error(exc, what) from None
