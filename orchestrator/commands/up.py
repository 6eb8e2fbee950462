"""`pdserve up`: run the disaggregated system and serve the OpenAI API until Ctrl-C.

By default everything is embedded: a private local Ray with logical GPU pools,
pdserve's tiny model (created once in the cache directory), one prefill and
one decode worker, the controller, and the router behind an HTTP server.
``--address`` joins an existing Ray cluster instead (its nodes must offer the
``prefill_pool`` / ``decode_pool`` resources and the GPUs asked for). Workers run on
CPU unless ``--device cuda`` puts each on the GPU Ray gives it. Ctrl-C or
SIGTERM stops exactly what was started; Ray itself is stopped only if this
command started it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket

from orchestrator.commands.device_flag import add_device_argument, device_problem
from orchestrator.commands.kv_flags import add_kv_arguments, kv_flags_problem

API_KEY_ENV = "PDSERVE_API_KEY"  # the same name the HTTP app reads; not imported, to keep --help light


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register `pdserve up` options."""
    parser.add_argument("--prefill", type=int, default=1, help="prefill workers (default 1; 0: decode prefills)")
    parser.add_argument("--decode", type=int, default=1, help="decode workers (default 1)")
    parser.add_argument("--model", default=None,
                        help="Hugging Face model directory (Llama/Qwen2 safetensors); default: the tiny model")
    parser.add_argument("--cache-dir", default=None,
                        help="where the tiny model is created once (default: $PDSERVE_CACHE or ~/.cache/pdserve)")
    add_kv_arguments(parser)
    add_device_argument(parser)
    parser.add_argument("--host", default="127.0.0.1", help="HTTP interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000; 0 picks a free one)")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                        help="require this bearer token (default: $PDSERVE_API_KEY; unset: no auth)")
    parser.add_argument("--placement", choices=("pack", "spread"), default="pack",
                        help="a prefill/decode pair on one node (pack) or on different nodes (spread)")
    parser.add_argument("--address", default=None,
                        help="join this Ray cluster (e.g. ray://head:10001 or auto) instead of starting one")
    parser.add_argument("--kv-blocks", type=int, default=512,
                        help="KV cache blocks per worker (16 tokens each; default 512)")
    parser.add_argument("--slo-class", action="append", default=[], metavar="NAME",
                        help="an SLO class clients may name in header x-pdserve-slo-class (repeatable; 'default' "
                             "is always accepted, any other name is answered 400)")


def _validate(args: argparse.Namespace) -> str | None:
    if args.prefill < 0:
        return "--prefill must be >= 0"
    if args.decode < 1:
        return "--decode must be >= 1"
    if args.kv_blocks < 1:
        return "--kv-blocks must be >= 1"
    if not 0 <= args.port <= 65535:
        return "--port must be within 0..65535"
    if any(not name.strip() for name in args.slo_class):
        return "--slo-class needs a non-empty name"
    return kv_flags_problem(args) or device_problem(args)


def port_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on now (None: it can, or port 0 picks a free one).

    Checked before Ray and the workers start, which takes seconds to minutes, rather than after.
    """
    if port == 0:
        return None
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        socket.create_server((host, port), family=family).close()
    except OSError as exc:
        # create_server's message adds the address again; the errno's text is enough
        reason = os.strerror(exc.errno) if exc.errno and not isinstance(exc, socket.gaierror) else exc.strerror or exc
        return f"cannot listen on {host}:{port}: {reason}"
    return None


def curl_hint(url: str, model: str, api_key: str | None) -> str:
    """A curl command line that works against this server, with the auth header when a key is required.

    The key itself is never printed (stdout often ends up in logs): the command reads it from
    ``$PDSERVE_API_KEY``, and says to set that when the key came from ``--api-key``.
    """
    body = json.dumps({"model": model, "prompt": "Hello", "max_tokens": 16})
    auth = ""
    if api_key:
        auth = f' -H "Authorization: Bearer ${API_KEY_ENV}"'
    hint = f"curl {url}/v1/completions -H 'content-type: application/json'{auth} -d '{body}'"
    if api_key and os.environ.get(API_KEY_ENV) != api_key:
        hint += f"  (with {API_KEY_ENV} set to the --api-key value)"
    return hint


def main(args: argparse.Namespace) -> int:
    """Start the system, print the endpoint, serve until interrupted."""
    import signal
    import sys
    import threading

    from orchestrator.runtime.embedded import start_embedded
    from orchestrator.runtime.placement import PlacementStrategy

    problem = _validate(args) or port_problem(args.host, args.port)
    if problem is not None:
        print(f"pdserve up: {problem}", file=sys.stderr)
        return 2
    print(f"starting {args.prefill} prefill + {args.decode} decode workers ...", flush=True)
    try:
        handle = start_embedded(
            num_prefill=args.prefill, num_decode=args.decode, model_dir=args.model, cache_dir=args.cache_dir,
            transport=args.transport, kv_poll_us=args.kv_poll_us, kv_tcp_congestion=args.kv_tcp_congestion,
            host=args.host, port=args.port, api_key=args.api_key,
            placement=PlacementStrategy(args.placement), address=args.address, num_kv_blocks=args.kv_blocks,
            slo_classes=args.slo_class, device=args.device,
        )
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"pdserve up: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"pdserve is serving {handle.model_dir.name} at {handle.url}/v1 (Ctrl-C to stop)", flush=True)
    print(f"  try: {curl_hint(handle.url, handle.model_dir.name, args.api_key)}", flush=True)
    try:
        while not stop.wait(0.5):
            if not handle.server.running:
                print("pdserve up: the HTTP server stopped", file=sys.stderr)
                break
    finally:
        print("stopping ...", flush=True)
        handle.stop()
    return 0
