"""The shm receiver's polling between layers (``EndpointOptions.poll_us``): A/B in one run.

One receiver process holds two shm endpoints, one that sleeps in ``recv``
as soon as a layer is handled (``poll_us=0``) and one that polls first
(``--poll-us``, default the library's). This process sends the same 32
layers to each, interleaved round by round with a memcpy of the same bytes,
so load drift on a shared machine hits all three alike; the two endpoints
swap places every round, since the second finds the layers in cache. Printed per size:
median GB/s, the ratio to memcpy, and the median per-round time ratio of
sleeping to polling (above 1: polling is faster).

    PYTHONPATH=. .venv/bin/python benchmarks/shm_poll.py [--pin] [--reps 15] [--poll-us 100]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
from multiprocessing.connection import Connection

import torch

from benchmarks.kv_transfer import (
    HEAD_DIM,
    NUM_KV_HEADS,
    NUM_LAYERS,
    TOKEN_LAYER_NBYTES,
    memcpy_timer,
    receiver_process,
    timed_rounds,
    transport_timer,
)
from workers.kv.interface import EndpointOptions, KVSpec
from workers.kv.registry import KVClient
from workers.kv.shm import ShmEndpoint

SPEC = KVSpec(NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, "float16")


def _receiver(conn: Connection, cpus: set[int] | None, poll_us: float) -> None:
    """Child process: a sleeping and a polling endpoint; answers expect/wait requests."""
    if cpus is not None:
        os.sched_setaffinity(0, cpus)
    torch.set_num_threads(1)
    endpoints = {
        name: ShmEndpoint(EndpointOptions(stall_timeout_s=60, poll_us=us))
        for name, us in (("sleeping", 0.0), ("polling", poll_us))
    }
    receivers = {}
    conn.send("ready")
    while (msg := conn.recv())[0] != "stop":
        if msg[0] == "expect":
            _, name, rid, num_tokens = msg
            receivers[rid] = endpoints[name].expect(rid, num_tokens, SPEC, lambda i, k, v: None)
            conn.send(receivers[rid].descriptor.to_json())
        else:
            conn.send(receivers.pop(msg[1]).wait(60).seconds)
    for endpoint in endpoints.values():
        endpoint.close()


def main() -> int:
    """Run the A/B for each size and print one line per size."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=15, help="timed rounds per size (one more warms up)")
    parser.add_argument("--sizes-mb", default="16,64", help="comma-separated transfer sizes in MB")
    parser.add_argument("--poll-us", type=float, default=EndpointOptions().poll_us, help="the polling endpoint's")
    parser.add_argument("--pin", action="store_true", help="receiver on the last CPU, this process on the others")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"shm receiver: sleeping vs polling {args.poll_us:g} us, {'pinned' if args.pin else 'unpinned'}, "
          f"median of {args.reps} rounds")
    with receiver_process(_receiver, (args.poll_us,), args.pin) as conn, contextlib.closing(KVClient()) as client:
        for mb in (int(x) for x in args.sizes_mb.split(",")):
            nbytes = (mb << 20) // (NUM_LAYERS * TOKEN_LAYER_NBYTES) * NUM_LAYERS * TOKEN_LAYER_NBYTES
            methods = {"memcpy": memcpy_timer(nbytes, per_layer=False)}
            methods |= {name: transport_timer(conn, client, name, nbytes) for name in ("sleeping", "polling")}
            # the two endpoints swap places every round: whichever goes second finds the source
            # layers in cache, which was worth ~5% at 16 MB
            times = timed_rounds(
                methods, args.reps,
                lambda rep: ("memcpy", "sleeping", "polling") if rep % 2 else ("memcpy", "polling", "sleeping"),
            )
            med = {name: statistics.median(ts) for name, ts in times.items()}
            per_round = statistics.median(s / p for s, p in zip(times["sleeping"], times["polling"], strict=True))
            cells = "  ".join(f"{n} {nbytes / med[n] / 1e9:.2f} GB/s ({med['memcpy'] / med[n]:.2f}x)" for n in methods)
            print(f"{mb:>5} MB  {cells}  sleeping/polling time per round {per_round:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
