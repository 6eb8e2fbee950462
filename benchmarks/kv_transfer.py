"""KV transfer benchmark: GB/s per transport beside same-run ceilings, and the TTFT cost of disaggregation.

Part 1 moves 16-256 MB of KV layer by layer (32 layers) from this process
to a receiver process, per transport, and prints the median GB/s beside
ceilings measured in the same run, methods interleaved round by round:
``memcpy`` (one call into a reused buffer of the whole size; for the 256 MB
copy glibc streams non-temporal stores over interleaved pages, which no
layer-sized copy gets), ``memcpy/layer`` (the same bytes copied one layer
per call into a reused destination: what a layer-wise path can at best do),
raw TCP loopback (``sendall`` / ``recv_into`` per layer into a reused layer
buffer, over a connection with the congestion control the tcp transport
picks: ``--tcp-congestion``, default ``auto``, which is reno on loopback;
under this machine's BBR both ran slower, the ceiling less at 16 MB and
more at 256 MB; its receiver sleeps in ``recv``, or polls first as the tcp
receiver does with ``--raw-poll``) and raw gloo (``send``/``recv`` of each
layer's K and V between the same two processes; torch_dist moves layers
that queue up in runs, fewer and larger messages, so it passes this ceiling
where layers are small), and where NIXL is
installed raw NIXL (a WRITE of each layer, from a registered buffer here
into a registered buffer of the receiver, both on huge pages as pdserve's
own; UCX moves it by CMA between processes of one host). Each transport's
ratio is printed against the ceilings of its path; nixl runs in a second
pass, with its own receiver process and ceilings. By
default the receiver's callback does nothing, so the numbers are the
transport's (checksums on); ``--layers clone`` clones each layer in the
callback, as a decode worker that hands layers to its engine thread must,
and ``--layers keep`` takes the private copies ``expect(keep=True)`` hands
out instead (from a shm slot, made in the pass that verifies it). The load
average is printed before and after: the machine may be shared. ``--pin``
puts the receiver on the last CPU and this process on the others, as
prefill and decode workers on separate cores. The transports copy and
checksum with the C kernel when it is built (workers.kv.native);
``PDSERVE_KV_PURE=1`` measures the numpy + xxhash path.
Last, each method runs ``reps`` more times in a pass of its own, and the CPU
time both processes spent per transfer (user + system, every thread) is
printed: on a host with few cores a transport that needs twice the CPU of
its ceiling cannot reach it, whatever its code does between system calls.

Part 2 runs a 2,048-token prompt on the tiny model: colocated (prefill and
the first decode step in one engine) vs disaggregated (prefill in process A
with the KV sent, then admission and the first decode step in process B),
with and without layer-wise overlap, and prints the extra time to the first
decoded token.

    PYTHONPATH=. .venv/bin/python benchmarks/kv_transfer.py [--quick] [--pin] [--kinds tcp,shm] [--layers clone|keep]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.util
import multiprocessing as mp
import os
import resource
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from workers.kv.congestion import apply_congestion_control
from workers.kv.descriptor import TransferDescriptor
from workers.kv.errors import KVTransferError
from workers.kv.framing import recv_polling, set_stall_timeout
from workers.kv.interface import EndpointOptions, KVSpec, SenderOptions
from workers.kv.registry import KVClient, open_endpoint

T = TypeVar("T")
NUM_LAYERS = 32
NUM_KV_HEADS, HEAD_DIM, DTYPE = 8, 128, "float16"
TOKEN_LAYER_NBYTES = 2 * NUM_KV_HEADS * HEAD_DIM * 2
KINDS: tuple[str, ...] = ("tcp", "shm", "torch_dist")
if importlib.util.find_spec("nixl") is not None:  # optional
    KINDS += ("nixl",)
CEILINGS_OF: dict[str, tuple[str, ...]] = {
    "tcp": ("raw_tcp",),
    "shm": ("memcpy", "memcpy/layer"),
    "torch_dist": ("raw_gloo", "raw_tcp"),
    "nixl": ("raw_nixl", "memcpy/layer"),
}
CEILINGS = ("memcpy", "memcpy/layer", "raw_tcp", "raw_gloo")
# What the receiver's callback does with each layer (--layers): nothing with the staging views (the
# transport alone), clone them (a decode worker that hands layers to its engine thread), or keep the
# private copies that expect(keep=True) hands out (from a shm slot: made in the pass that verifies it)
def _ignore(layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
    """Receiver callback that does nothing with the layer."""


def _clone(layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
    """Receiver callback that copies the layer out of the staging, as a decode worker must without keep."""
    k.clone(), v.clone()


ON_LAYER: dict[str, Callable[[int, torch.Tensor, torch.Tensor], None]] = {"views": _ignore, "clone": _clone, "keep": _ignore}


def receiver_main(
    conn: Connection, cpus: set[int] | None, kinds: tuple[str, ...], layers: str, options: EndpointOptions
) -> None:
    """Child process: one endpoint per transport, plus a raw TCP sink for the ceiling."""
    if cpus is not None:
        os.sched_setaffinity(0, cpus)  # before any thread starts: threads inherit it
    torch.set_num_threads(1)
    endpoints = {k: open_endpoint(k, options) for k in kinds}
    receivers = {}
    spec = KVSpec(NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, DTYPE)
    sink = socket.socket()
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sink.bind(("127.0.0.1", 0))
    sink.listen(4)

    def raw_sink(nbytes: int, poll_s: float) -> None:
        layer = nbytes // NUM_LAYERS
        view = memoryview(bytearray(layer))  # one reused layer buffer, like a transport's staging
        sock, _ = sink.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if poll_s > 0:  # polls as the tcp receiver does (--raw-poll)
            set_stall_timeout(sock, None)
            try:
                while True:
                    for _ in range(NUM_LAYERS):
                        recv_polling(sock, (view,), "a layer", poll_s)
                    sock.sendall(b"k")
            except KVTransferError:  # the sender closed the connection
                sock.close()
                return
        while True:
            for _ in range(NUM_LAYERS):
                got = 0
                while got < layer:
                    n = sock.recv_into(view[got:], layer - got)
                    if n == 0:
                        sock.close()
                        return
                    got += n
            sock.sendall(b"k")

    def raw_gloo(store_port: int, nbytes: int) -> None:
        import datetime

        import torch.distributed as dist

        store = dist.TCPStore("127.0.0.1", store_port, is_master=False, timeout=datetime.timedelta(seconds=60))
        group: Any = dist.ProcessGroupGloo(store, 1, 2, datetime.timedelta(seconds=60))
        layer = torch.zeros(nbytes // NUM_LAYERS, dtype=torch.uint8)  # reused, touched up front
        half = layer.numel() // 2
        go = torch.zeros(1, dtype=torch.int64)
        while True:
            group.recv([go], 0, 0).wait()
            if not int(go.item()):
                return
            for _ in range(NUM_LAYERS):
                works = [group.recv([layer[:half]], 0, 0), group.recv([layer[half:]], 0, 0)]
                for work in works:
                    work.wait()
            group.send([go], 0, 0).wait()

    raw_nixl: tuple[Any, torch.Tensor] | None = None
    conn.send("ready")
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            break
        if msg[0] == "expect":
            _, kind, rid, num_tokens = msg
            receivers[rid] = endpoints[kind].expect(rid, num_tokens, spec, ON_LAYER[layers], keep=layers == "keep")
            conn.send(receivers[rid].descriptor.to_json())
        elif msg[0] == "wait":
            conn.send(receivers.pop(msg[1]).wait(120).seconds)
        elif msg[0] == "cpu":
            conn.send(_cpu_s())
        elif msg[0] == "raw":
            threading.Thread(target=raw_sink, args=msg[1:], daemon=True).start()
            conn.send(sink.getsockname()[1])
        elif msg[0] == "gloo":
            threading.Thread(target=raw_gloo, args=msg[1:], daemon=True).start()
            conn.send("ok")
        elif msg[0] == "nixl":  # the raw NIXL ceiling's target: a registered layer buffer, kept until the next
            from workers.kv.hugepages import huge_page_buffer
            from workers.kv.nixl import NixlAgent

            if raw_nixl is not None:
                raw_nixl[0].close()
            raw_nixl = (NixlAgent("raw-recv", progress=True), huge_page_buffer(msg[1] // NUM_LAYERS))
            raw_nixl[0].register(raw_nixl[1])
            conn.send({**raw_nixl[0].metadata(), "addr": raw_nixl[1].data_ptr()})
    for endpoint in endpoints.values():
        endpoint.close()
    if raw_nixl is not None:
        raw_nixl[0].close()  # its progress thread, left running, was cut off at exit ("terminate called ...")


def memcpy_timer(nbytes: int, per_layer: bool) -> Callable[[], float]:
    """The ceiling ``memcpy`` (or ``memcpy/layer``): a timed copy of ``nbytes`` into a reused buffer."""
    src = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    dst = np.zeros(nbytes, dtype=np.uint8)
    layer = nbytes // NUM_LAYERS

    def once() -> float:
        t0 = time.perf_counter()
        if per_layer:
            for i in range(NUM_LAYERS):
                np.copyto(dst[i * layer : (i + 1) * layer], src[i * layer : (i + 1) * layer])
        else:
            np.copyto(dst, src)  # numpy's copy is memcpy; torch's uint8 copy_ ran at half its speed here
        return time.perf_counter() - t0

    return once


def _raw_gloo(conn: Connection, nbytes: int) -> tuple[Callable[[], float], Callable[[], None]]:
    """Ceiling of torch_dist: gloo send/recv of each layer's K and V to the same receiver process."""
    import datetime

    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=60))
    conn.send(("gloo", store.port, nbytes))
    group: Any = dist.ProcessGroupGloo(store, 0, 2, datetime.timedelta(seconds=60))
    assert conn.recv() == "ok"
    data = torch.ones(nbytes, dtype=torch.uint8)
    layer = nbytes // NUM_LAYERS
    half = layer // 2

    def signal(value: int) -> None:
        group.send([torch.full((1,), value, dtype=torch.int64)], 1, 0).wait()

    def once() -> float:
        t0 = time.perf_counter()
        signal(1)
        for i in range(NUM_LAYERS):
            k, v = data[i * layer : i * layer + half], data[i * layer + half : (i + 1) * layer]
            works = [group.send([k], 1, 0), group.send([v], 1, 0)]
            for work in works:
                work.wait()
        group.recv([torch.zeros(1, dtype=torch.int64)], 1, 0).wait()
        return time.perf_counter() - t0

    def stop() -> None:
        signal(0)

    return once, stop


def _raw_nixl(conn: Connection, nbytes: int) -> Callable[[], float]:
    """Ceiling of nixl: a NIXL WRITE of each layer into one registered layer buffer of the receiver process."""
    from workers.kv.hugepages import huge_page_buffer
    from workers.kv.nixl import NixlAgent

    conn.send(("nixl", nbytes))
    info = conn.recv()
    agent = NixlAgent("raw-send", progress=False)
    data = huge_page_buffer(nbytes)
    data.fill_(1)
    agent.register(data)
    peer = agent.load_peer(info)
    layer = nbytes // NUM_LAYERS

    def once() -> float:
        t0 = time.perf_counter()
        for i in range(NUM_LAYERS):
            agent.write(data.data_ptr() + i * layer, layer, peer, info["addr"], 60.0)
        return time.perf_counter() - t0

    return once


def raw_tcp_connection(
    conn: Connection, nbytes: int, congestion: str, poll_us: float = 0.0
) -> tuple[socket.socket, str]:
    """A connection to the receiver process's raw sink for ``nbytes`` transfers, and its congestion control.

    ``poll_us`` > 0: the sink polls this long before it sleeps in recv, as the tcp receiver does.
    """
    conn.send(("raw", nbytes, poll_us * 1e-6))
    sock = socket.create_connection(("127.0.0.1", conn.recv()))
    algorithm = apply_congestion_control(sock, congestion) or _host_algorithm()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    return sock, algorithm


def _raw_tcp(
    conn: Connection, nbytes: int, congestion: str, poll_us: float
) -> tuple[Callable[[], float], socket.socket, str]:
    """The raw TCP ceiling over a connection with the congestion control the tcp transport uses."""
    data = memoryview(bytearray(b"\x01" * nbytes))
    sock, algorithm = raw_tcp_connection(conn, nbytes, congestion, poll_us)
    layer = nbytes // NUM_LAYERS

    def once() -> float:
        t0 = time.perf_counter()
        for i in range(NUM_LAYERS):
            sock.sendall(data[i * layer : (i + 1) * layer])
        sock.recv(1)
        return time.perf_counter() - t0

    return once, sock, algorithm


def _host_algorithm() -> str:
    """The host's default TCP congestion control."""
    try:
        return Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    except OSError:
        return "the host's default"


def timed_rounds(
    methods: dict[str, Callable[[], T]], reps: int, order: Callable[[int], Sequence[str]] | None = None
) -> dict[str, list[T]]:
    """Each method once per round, for one warm-up round and ``reps`` timed ones; ``order(round)`` sets a round's order.

    Interleaving puts load drift on a shared machine on every method alike.
    """
    times: dict[str, list[T]] = {name: [] for name in methods}
    for rep in range(reps + 1):  # round 0 warms up: page faults, connections, mappings
        for name in order(rep) if order is not None else methods:
            elapsed = methods[name]()
            if rep:
                times[name].append(elapsed)
    return times


def transport_timer(conn: Connection, client: KVClient, kind: str, nbytes: int) -> Callable[[], float]:
    """A timed transfer of ``nbytes`` to the receiver process's endpoint ``kind`` (open to finish)."""
    num_tokens = nbytes // (NUM_LAYERS * TOKEN_LAYER_NBYTES)
    shape = (num_tokens, NUM_KV_HEADS, HEAD_DIM)
    layers = [(torch.randn(shape).half(), torch.randn(shape).half()) for _ in range(NUM_LAYERS)]
    counter = iter(range(10**6))

    def once() -> float:
        rid = f"{kind}-{nbytes}-{next(counter)}"
        conn.send(("expect", kind, rid, num_tokens))
        desc = TransferDescriptor.from_json(conn.recv())
        t0 = time.perf_counter()
        sender = client.open(desc)
        for i, (k, v) in enumerate(layers):
            sender.send_layer(i, k, v)
        sender.finish()
        elapsed = time.perf_counter() - t0
        conn.send(("wait", rid))
        conn.recv()
        return elapsed

    return once


def split_cpus() -> tuple[set[int], set[int]]:
    """(sender's, receiver's) CPUs: the receiver gets the last one, the sender the others."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("--pin needs at least two CPUs")
    return set(cpus[:-1]), {cpus[-1]}


@contextlib.contextmanager
def receiver_process(target: Callable[..., None], args: tuple[Any, ...], pin: bool) -> Iterator[Connection]:
    """A spawned receiver process running ``target(conn, cpus, *args)``; yields this side's pipe end.

    ``pin``: the receiver on the last CPU (``cpus``; None unpinned) and this process on the others,
    as prefill and decode workers on separate cores, until the block ends and the receiver is stopped.
    """
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    own_cpus = os.sched_getaffinity(0)
    sender_cpus, receiver_cpus = split_cpus() if pin else (own_cpus, None)
    proc = ctx.Process(target=target, args=(child, receiver_cpus, *args), daemon=True)
    proc.start()
    while not conn.poll(0.5):  # a receiver that dies while starting would leave recv() waiting forever
        if not proc.is_alive():
            raise SystemExit(f"the receiver process exited ({proc.exitcode}) before it was ready")
    assert conn.recv() == "ready"
    os.sched_setaffinity(0, sender_cpus)  # before this process's sending threads start
    try:
        yield conn
    finally:
        conn.send(("stop",))
        proc.join(30)
        os.sched_setaffinity(0, own_cpus)


def bandwidth(
    sizes_mb: list[int], reps: int, kinds: tuple[str, ...] = KINDS, pin: bool = False, layers: str = "views",
    poll_us: float | None = None, tcp_congestion: str = SenderOptions().tcp_congestion, raw_poll: bool = False,
) -> None:
    """Part 1: GB/s per transport and ceiling, per size (methods interleaved, so load drift hits all alike)."""
    options = EndpointOptions(stall_timeout_s=60, staging_nbytes=8 << 20)
    if poll_us is not None:
        options = dataclasses.replace(options, poll_us=poll_us)
    placement = "unpinned"
    if pin:
        sender_cpus, receiver_cpus = split_cpus()
        placement = f"sender on CPUs {sorted(sender_cpus)}, receiver on {sorted(receiver_cpus)}"
    placement += f"; receiver's layers: {layers}"
    print(f"\n== KV transfer bandwidth: {NUM_LAYERS} layers, {DTYPE}, sender here -> receiver process ({placement}); "
          f"median of {reps}, GB/s; load average {_load()} ==")
    ceilings = (*CEILINGS, "raw_nixl") if "nixl" in kinds else CEILINGS
    names = (*ceilings, *kinds)
    print(f"{'MB':>5} " + " ".join(f"{n:>12}" for n in names))
    lines: list[str] = []
    cpu_lines: list[str] = []
    with (
        receiver_process(receiver_main, (kinds, layers, options), pin) as conn,
        contextlib.closing(KVClient(SenderOptions(tcp_congestion=tcp_congestion))) as client,
    ):
        for mb in sizes_mb:
            nbytes = (mb << 20) // (NUM_LAYERS * TOKEN_LAYER_NBYTES) * NUM_LAYERS * TOKEN_LAYER_NBYTES
            raw_once, raw_sock, algorithm = _raw_tcp(conn, nbytes, tcp_congestion, options.poll_us if raw_poll else 0.0)
            if mb == sizes_mb[0]:
                print(f"(TCP congestion control of raw TCP and tcp alike: {algorithm}; tcp_congestion={tcp_congestion!r}; "
                      f"raw TCP's receiver {'polls' if raw_poll else 'sleeps in recv'})")
            gloo_once, gloo_stop = _raw_gloo(conn, nbytes)
            methods = {
                "memcpy": memcpy_timer(nbytes, per_layer=False), "memcpy/layer": memcpy_timer(nbytes, per_layer=True),
                "raw_tcp": raw_once, "raw_gloo": gloo_once,
            }
            if "nixl" in kinds:
                methods["raw_nixl"] = _raw_nixl(conn, nbytes)
            methods |= {kind: transport_timer(conn, client, kind, nbytes) for kind in kinds}
            times = timed_rounds(methods, reps)
            # CPU time in a pass of its own: asking the receiver for its usage around each timed call
            # woke it just before the transfer and cost 16 MB shm a fifth of its speed
            cpu: dict[str, tuple[float, float]] = {}
            for name, once in methods.items():
                conn.send(("cpu",))
                sender_cpu, receiver_cpu = _cpu_s(), conn.recv()
                for _ in range(reps):
                    once()
                conn.send(("cpu",))
                cpu[name] = ((_cpu_s() - sender_cpu) / reps, (conn.recv() - receiver_cpu) / reps)
            raw_sock.close()
            gloo_stop()
            gbps = {name: nbytes / statistics.median(ts) / 1e9 for name, ts in times.items()}
            print(f"{mb:>5} " + " ".join(f"{gbps[n]:>12.2f}" for n in names), flush=True)
            for k in kinds:
                # per-round ratios too: on a shared host the load drifts between rounds, less within one
                ratios = ", ".join(
                    f"{gbps[k] / gbps[c]:.2f}x {c} (per round {_paired_ratio(times[c], times[k]):.2f}x)"
                    for c in CEILINGS_OF[k]
                )
                lines.append(f"{mb:>5} MB {k:>11}: {ratios}")
            cpu_lines.append(f"{mb:>5} " + " ".join(f"{1e3 * cpu[n][0]:>6.1f}+{1e3 * cpu[n][1]:<5.1f}" for n in names))
            # free this size's gloo group now: left to the collector, it was destroyed at exit with its
            # threads running ("terminate called without an active exception")
            del methods, gloo_once, gloo_stop
            gc.collect()
    print("ratio to the ceilings of each path (medians of the same run):")
    print("\n".join(lines))
    print("CPU ms per transfer, sender + receiver process (means of a pass of their own; all threads, user + system):")
    print(f"{'MB':>5} " + " ".join(f"{n:>12}" for n in names))
    print("\n".join(cpu_lines))
    print(f"load average after: {_load()}")


def _cpu_s() -> float:
    """CPU seconds (user + system) used so far by every thread of this process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _paired_ratio(ceiling_s: list[float], transport_s: list[float]) -> float:
    """Median over rounds of (ceiling time / transport time) measured in the same round."""
    return statistics.median(c / t for c, t in zip(ceiling_s, transport_s, strict=True))


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def ttft(prompt_len: int, reps: int, cache_dir: str, verbose: bool = False) -> None:
    """Part 2: extra time to the first decoded token, disaggregated vs colocated."""
    from workers.engine.config import EngineConfig
    from workers.engine.engine import LLMEngine
    from workers.engine.sampling_params import SamplingParams
    from workers.engine.tiny import ensure_tiny_model
    from workers.kv.descriptor import TransportKind
    from workers.kv.local_pair import LocalPair, PairRequest

    torch.set_num_threads(1)
    model_dir = ensure_tiny_model(cache_dir)
    sampling = SamplingParams(max_tokens=2, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    prompt = tuple(torch.randint(10, 30000, (prompt_len,), generator=gen).tolist())

    engine = LLMEngine(model_dir, EngineConfig(max_num_batched_tokens=max(4096, prompt_len)))
    counter = iter(range(10**6))

    def colocated() -> tuple[float, float, float]:
        rid = f"colo-{next(counter)}"
        t0 = time.perf_counter()
        engine.add_request(rid, prompt, sampling)
        engine.step()  # the prompt, sampling token 1
        t1 = time.perf_counter()
        engine.step()  # first decode step, token 2
        t2 = time.perf_counter()
        return t2 - t0, 0.0, t2 - t1

    kinds = [TransportKind.TCP, TransportKind.SHM, TransportKind.TORCH_DIST]
    with LocalPair(model_dir, kinds) as pair:

        def disagg(kind: TransportKind, overlap: bool) -> Callable[[], tuple[float, float, float]]:
            def once() -> tuple[float, float, float]:
                rid = f"{kind.value}-{overlap}-{next(counter)}"
                r = pair.run(PairRequest(rid, prompt, sampling, kind=kind, overlap=overlap))
                # critical path measured inside the two processes (the pipes of this harness left out)
                return r.prefill_s + r.first_decode_s, r.transfer_tail_s, r.first_decode_s

            return once

        methods: dict[str, Callable[[], tuple[float, float, float]]] = {"colocated": colocated}
        for kind in kinds:
            for overlap in (True, False):
                methods[f"{kind.value} overlap={'on' if overlap else 'off'}"] = disagg(kind, overlap)
        samples = timed_rounds(methods, reps)

    def med(name: str, i: int) -> float:
        return statistics.median(s[i] for s in samples[name])

    if verbose:
        for name, values in samples.items():
            print(name, [tuple(round(x * 1e3, 1) for x in v) for v in values])
    colo_s, colo_step_s = med("colocated", 0), med("colocated", 2)
    print(f"\n== time to first decoded token, {prompt_len}-token prompt, tiny model (median of {reps}, interleaved) ==")
    print(f"{'colocated (prefill + 1 decode step)':<36} {colo_s * 1e3:8.1f} ms   (decode step {colo_step_s * 1e3:.1f} ms)")
    print("  'added' = transfer tail after the prompt is computed (A) + wait, admission and first decode step (B)")
    print("  - the colocated decode step: the disaggregation cost without the prefill-time noise of a shared machine")
    for name in list(methods)[1:]:
        total, tail, b_side = med(name, 0), med(name, 1), med(name, 2)
        added = tail + b_side - colo_step_s
        print(f"{'disaggregated ' + name:<36} {total * 1e3:8.1f} ms  ratio {total / colo_s:.3f}x  "
              f"added {added * 1e3:+6.1f} ms = tail {tail * 1e3:.1f} ms + B {b_side * 1e3:.1f} ms "
              f"- {colo_step_s * 1e3:.1f} ms", flush=True)


def main() -> int:
    """Parse flags and run both parts."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16 and 64 MB, 3 repetitions")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per measurement (median reported)")
    parser.add_argument("--prompt-len", type=int, default=2048, help="prompt tokens for the TTFT part")
    parser.add_argument("--cache-dir", default=None, help="tiny model cache (default: a temp dir)")
    parser.add_argument("--skip-ttft", action="store_true", help="only the bandwidth part")
    parser.add_argument("--skip-bandwidth", action="store_true", help="only the TTFT part")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated transports to measure")
    parser.add_argument("--sizes-mb", default=None, help="comma-separated transfer sizes in MB")
    parser.add_argument("--verbose", action="store_true", help="print every TTFT sample")
    parser.add_argument("--pin", action="store_true",
                        help="bandwidth part: receiver process on the last CPU, this process on the others, as "
                             "prefill and decode workers on separate cores (on two cores, unpinned, the scheduler "
                             "often woke the receiver on the sender's busy CPU and it waited milliseconds)")
    parser.add_argument("--poll-us", type=float, default=None,
                        help="bandwidth part: the shm and tcp receivers' EndpointOptions.poll_us (default: the library's)")
    parser.add_argument("--tcp-congestion", default=SenderOptions().tcp_congestion,
                        help="bandwidth part: SenderOptions.tcp_congestion of the tcp transport, also applied to the raw "
                             "TCP ceiling: 'auto' (default: reno on loopback), 'system', or an algorithm such as 'bbr'")
    parser.add_argument("--raw-poll", action="store_true",
                        help="bandwidth part: the raw TCP ceiling's receiver polls before it sleeps, as the tcp receiver "
                             "does (poll_us): a stronger ceiling (default: it sleeps in recv)")
    parser.add_argument("--layers", choices=sorted(ON_LAYER), default="views",
                        help="bandwidth part: what the receiver does with each layer: nothing with the staging "
                             "views (default), clone them, or keep the copies expect(keep=True) hands out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    reps = args.reps or (3 if args.quick else 7)
    if not args.skip_bandwidth:
        sizes = [int(x) for x in args.sizes_mb.split(",")] if args.sizes_mb else [16, 64] if args.quick else [16, 64, 256]
        kinds = tuple(args.kinds.split(","))
        # nixl gets a run (receiver process, ceilings) of its own: measured beside its agents and registered
        # buffers, shm at 16 MB ran 0.56-0.80x memcpy in four runs, against 0.79 and 0.92x in two without
        for group in (tuple(k for k in kinds if k != "nixl"), tuple(k for k in kinds if k == "nixl")):
            if group:
                bandwidth(
                    sizes, reps, group, pin=args.pin, layers=args.layers, poll_us=args.poll_us,
                    tcp_congestion=args.tcp_congestion, raw_poll=args.raw_poll,
                )
    if not args.skip_ttft:
        cache_dir = args.cache_dir or str(Path(tempfile.gettempdir()) / "pdserve-bench-cache")
        ttft(args.prompt_len, reps, cache_dir, verbose=args.verbose)
    return 0


if __name__ == "__main__":
    sys.exit(main())
