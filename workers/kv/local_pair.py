"""A prefill engine and a decode engine in two local OS processes, joined by a KV transport.

Used by ``pdserve generate``, the cross-process tests and the benchmark.
Per request, the parent (the "router") asks the decode process to reserve
and open a receiver, passes the descriptor to the prefill process, which
prefills while streaming layers, then forwards the first token to the
decode process, which admits the request and decodes to the end. Control
messages go over multiprocessing pipes; KV bytes go over the transport.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from workers.engine.sampling_params import SamplingParams
from workers.kv.descriptor import TransferDescriptor, TransferStats, TransportKind
from workers.kv.errors import KVTransferError
from workers.kv.interface import EndpointOptions, SenderOptions


@dataclass(frozen=True, slots=True)
class PairRequest:
    """One prompt to run disaggregated."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    kind: TransportKind | None = None  # None: the pair's first transport
    overlap: bool = True  # False: send all layers after prefill finishes (baseline)


@dataclass(frozen=True, slots=True)
class PairResult:
    """What came back: every generated token (the prefill's first one included) and timings."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    send_stats: TransferStats
    recv_stats: TransferStats
    prefill_s: float  # prefill process: prefill + last layer acknowledged
    transfer_tail_s: float  # prefill process: prompt computed -> last layer acknowledged
    first_decode_s: float  # decode process: transfer wait + admission + first decode step


def _reply(conn: Connection, fn: Any, *args: Any) -> None:
    try:
        conn.send(("ok", fn(*args)))
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


def _ignore_interrupts() -> None:
    """Leave Ctrl-C to the parent, which stops both children: in them it only printed a KeyboardInterrupt traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _decode_main(conn: Connection, model_dir: str, kinds: list[str], options: EndpointOptions) -> None:
    _ignore_interrupts()
    import torch

    from workers.engine.config import EngineConfig, EngineRole
    from workers.engine.engine import LLMEngine
    from workers.kv.engine_link import expect_into_engine
    from workers.kv.registry import open_endpoint

    torch.set_num_threads(1)
    engine = LLMEngine(model_dir, EngineConfig(role=EngineRole.DECODE_ONLY))
    endpoints = {kind: open_endpoint(kind, options) for kind in kinds}
    receivers: dict[str, Any] = {}

    def expect(request_id: str, num_tokens: int, kind: str) -> str:
        receivers[request_id] = expect_into_engine(engine, endpoints[kind], request_id, num_tokens)
        return str(receivers[request_id].descriptor.to_json())

    def decode(request_id: str, prompt: tuple[int, ...], first: int, sampling: SamplingParams) -> Any:
        t0 = time.perf_counter()
        try:
            stats = receivers.pop(request_id).wait(options.stall_timeout_s)
        except BaseException:
            engine.release(request_id)
            raise
        engine.add_prefilled_request(request_id, prompt, first, sampling)
        tokens: list[int] = []
        text: list[str] = []
        first_decode_s = 0.0
        finished = False
        while not finished:
            for out in engine.step():
                if out.request_id == request_id:
                    tokens.extend(out.new_token_ids)
                    text.append(out.new_text)
                    finished = out.finished
            first_decode_s = first_decode_s or time.perf_counter() - t0
        return tuple(tokens), "".join(text), stats, first_decode_s

    conn.send(("ok", "ready"))
    try:
        while True:
            msg = conn.recv()
            if msg[0] == "stop":
                return
            _reply(conn, expect if msg[0] == "expect" else decode, *msg[1:])
    finally:
        for endpoint in endpoints.values():
            endpoint.close()


def _prefill_main(conn: Connection, model_dir: str, options: SenderOptions) -> None:
    _ignore_interrupts()
    import torch

    from workers.engine.config import EngineConfig, EngineRole
    from workers.engine.engine import LLMEngine
    from workers.kv.engine_link import prefill_and_send
    from workers.kv.registry import KVClient

    torch.set_num_threads(1)
    engine = LLMEngine(model_dir, EngineConfig(role=EngineRole.PREFILL_ONLY, max_num_batched_tokens=4096))
    client = KVClient(options)

    def prefill(descriptor_json: str, prompt: tuple[int, ...], sampling: SamplingParams, overlap: bool) -> Any:
        desc = TransferDescriptor.from_json(descriptor_json)
        t0 = time.perf_counter()
        sent = prefill_and_send(engine, client.open(desc), desc.request_id, prompt, sampling, overlap)
        first = sent.first_token_id
        text = engine.tokenizer.decode([first]) if engine.tokenizer is not None else ""
        return first, text, sent.stats, time.perf_counter() - t0, sent.tail_s

    conn.send(("ok", "ready"))
    try:
        while True:
            msg = conn.recv()
            if msg[0] == "stop":
                return
            _reply(conn, prefill, *msg[1:])
    finally:
        client.close()


class LocalPair:
    """Context manager owning a decode process and a prefill process."""

    def __init__(
        self,
        model_dir: str | Path,
        kinds: Sequence[TransportKind | str],
        endpoint_options: EndpointOptions | None = None,
        sender_options: SenderOptions | None = None,
        timeout_s: float = 120.0,
    ) -> None:
        self.kinds = [TransportKind(k) for k in kinds]
        if not self.kinds:
            raise ValueError("LocalPair needs at least one transport kind")
        self._timeout_s = timeout_s
        ctx = mp.get_context("spawn")
        self._decode, decode_child = ctx.Pipe()
        self._prefill, prefill_child = ctx.Pipe()
        args_d = (decode_child, str(model_dir), [k.value for k in self.kinds], endpoint_options or EndpointOptions())
        args_p = (prefill_child, str(model_dir), sender_options or SenderOptions())
        self._procs = [
            ctx.Process(target=_decode_main, args=args_d, name="pdserve-decode", daemon=True),
            ctx.Process(target=_prefill_main, args=args_p, name="pdserve-prefill", daemon=True),
        ]
        for proc in self._procs:
            proc.start()
        self._ready = False  # the processes load their engines while the caller does other work

    def wait_ready(self) -> None:
        """Block until both processes loaded their engines (``run`` calls it)."""
        if self._ready:
            return
        try:
            self._call(self._decode)
            self._call(self._prefill)
        except BaseException:
            self.close()
            raise
        self._ready = True

    def _call(self, conn: Connection, *msg: Any) -> Any:
        if msg:
            conn.send(msg)
        deadline = time.monotonic() + self._timeout_s
        while not conn.poll(0.1):
            dead = [p.name for p in self._procs if not p.is_alive()]
            if dead:
                raise KVTransferError(f"worker process {dead} exited unexpectedly")
            if time.monotonic() > deadline:
                raise KVTransferError(f"worker process did not answer within {self._timeout_s}s")
        status, value = conn.recv()
        if status != "ok":
            raise KVTransferError(f"worker process failed: {value}")
        return value

    def run(self, request: PairRequest) -> PairResult:
        """Run one request disaggregated and return its tokens and stats."""
        self.wait_ready()
        rid = request.request_id
        kind = TransportKind(request.kind or self.kinds[0])
        desc = self._call(self._decode, "expect", rid, len(request.prompt_token_ids), kind.value)
        first, first_text, send_stats, prefill_s, tail_s = self._call(
            self._prefill, "prefill", desc, request.prompt_token_ids, request.sampling, request.overlap
        )
        tokens, text, recv_stats, first_decode_s = self._call(
            self._decode, "decode", rid, request.prompt_token_ids, first, request.sampling
        )
        return PairResult(
            rid, (first, *tokens), first_text + text, send_stats, recv_stats, prefill_s, tail_s, first_decode_s
        )

    def close(self) -> None:
        """Stop both processes."""
        for conn in (self._decode, self._prefill):
            try:
                conn.send(("stop",))
            except OSError:
                pass
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)

    def __enter__(self) -> LocalPair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def reference_tokens(model_dir: str | Path, prompts: list[tuple[int, ...]], sampling: SamplingParams) -> list[tuple[int, ...]]:
    """Greedy tokens of each prompt from one colocated engine in this process."""
    from workers.engine.engine import LLMEngine

    engine = LLMEngine(model_dir)
    return [engine.generate([list(p)], sampling)[0].token_ids for p in prompts]
