"""What the sender's checksum costs a TCP loopback transfer: raw, raw + the sender's hash, and the tcp transport.

The tcp transport's sender hashes every byte it sends (the receiver checks
each layer against it). On a host with few cores that pass shares the
sending core with the kernel's copy into the socket. This benchmark sends
the same 32 layers (K and V tensors) to one receiver process three ways,
interleaved round by round and rotating their order (whichever runs later in
a round finds more of the source in cache):

- ``raw``: ``sendmsg`` of each layer's K and V, nothing else (the receiver
  reads each layer into a reused buffer, as kv_transfer.py's raw TCP);
- ``raw+hash``: the same bytes sent a checksum block at a time, each block
  hashed right after its send, as the transport's sender does (what the
  sender's checksum adds, with no framing, threads or receiver check);
- ``tcp``: the tcp transport (framing, pipelined sender, polling receiver
  that verifies every layer).

All three connections use the congestion control the tcp transport picks.
Printed per size: median GB/s and the median per-round time ratios against
``raw``.

    PYTHONPATH=. .venv/bin/python benchmarks/tcp_checksum_cost.py [--pin] [--reps 21] [--sizes-mb 16,64]
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import statistics
import sys
import time
from collections.abc import Callable

import torch

from benchmarks.kv_transfer import (
    HEAD_DIM,
    NUM_KV_HEADS,
    NUM_LAYERS,
    TOKEN_LAYER_NBYTES,
    raw_tcp_connection,
    receiver_main,
    receiver_process,
    timed_rounds,
    transport_timer,
)
from workers.kv.checksum import block_groups, hash_block
from workers.kv.framing import send_vectored
from workers.kv.interface import EndpointOptions, SenderOptions
from workers.kv.pipeline import as_bytes
from workers.kv.registry import KVClient

WAYS = ("raw", "raw+hash", "tcp")


def raw_timer(sock: socket.socket, layers: list[tuple[memoryview, memoryview]], hashed: bool) -> Callable[[], float]:
    """A timed transfer of ``layers`` over the raw sink connection.

    ``hashed``: each layer goes a checksum block at a time, each block hashed right after its send,
    as the tcp transport's sender does; otherwise each layer is one ``sendmsg``.
    """

    def once() -> float:
        t0 = time.perf_counter()
        for k, v in layers:
            if not hashed:
                send_vectored(sock, (k, v))
                continue
            value = 0
            for pieces in block_groups((k, v)):
                send_vectored(sock, pieces)
                value = hash_block(pieces, value)
        sock.recv(1)
        return time.perf_counter() - t0

    return once


def main() -> int:
    """Run the three ways for each size and print one line per size."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=21, help="timed rounds per size (one more warms up)")
    parser.add_argument("--sizes-mb", default="16,64", help="comma-separated transfer sizes in MB")
    parser.add_argument("--raw-poll", action="store_true",
                        help="raw and raw+hash go to a receiver that polls before it sleeps, as the tcp receiver does")
    parser.add_argument("--pin", action="store_true", help="receiver on the last CPU, this process on the others")
    args = parser.parse_args()
    torch.set_num_threads(1)
    options = EndpointOptions(stall_timeout_s=60, staging_nbytes=8 << 20)
    congestion = SenderOptions().tcp_congestion
    print(f"tcp loopback, {'pinned' if args.pin else 'unpinned'}, median of {args.reps} rounds; the raw receiver "
          f"{'polls' if args.raw_poll else 'sleeps in recv'}, tcp's polls")
    with (
        receiver_process(receiver_main, (("tcp",), "views", options), args.pin) as conn,
        contextlib.closing(KVClient(SenderOptions(tcp_congestion=congestion))) as client,
    ):
        for mb in (int(x) for x in args.sizes_mb.split(",")):
            nbytes = (mb << 20) // (NUM_LAYERS * TOKEN_LAYER_NBYTES) * NUM_LAYERS * TOKEN_LAYER_NBYTES
            shape = (nbytes // (NUM_LAYERS * TOKEN_LAYER_NBYTES), NUM_KV_HEADS, HEAD_DIM)
            tensors = [(torch.randn(shape).half(), torch.randn(shape).half()) for _ in range(NUM_LAYERS)]
            views = [(as_bytes(k), as_bytes(v)) for k, v in tensors]
            sock, algorithm = raw_tcp_connection(conn, nbytes, congestion, options.poll_us if args.raw_poll else 0.0)
            methods = {
                "raw": raw_timer(sock, views, hashed=False), "raw+hash": raw_timer(sock, views, hashed=True),
                "tcp": transport_timer(conn, client, "tcp", nbytes),
            }
            times = timed_rounds(methods, args.reps, lambda rep: WAYS[rep % 3 :] + WAYS[: rep % 3])  # each place in turn
            sock.close()
            med = {name: statistics.median(ts) for name, ts in times.items()}
            cells = "  ".join(f"{n} {nbytes / med[n] / 1e9:.2f} GB/s" for n in WAYS)
            ratios = "  ".join(
                f"{n}/raw {statistics.median(r / x for r, x in zip(times['raw'], times[n], strict=True)):.2f}x"
                for n in WAYS[1:]
            )
            print(f"{mb:>5} MB  {cells}  per round: {ratios}  ({algorithm})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
