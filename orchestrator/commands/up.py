"""`pdserve up`: run the disaggregated system and serve the OpenAI API until Ctrl-C.

By default everything is embedded: a private local Ray with logical GPU pools,
pdserve's tiny model (created once in the cache directory), one prefill and
one decode worker, the controller, and the router behind an HTTP server.
``--address`` joins an existing Ray cluster instead (its nodes must offer the
``prefill_pool`` / ``decode_pool`` resources and the GPUs asked for). Ctrl-C or
SIGTERM stops exactly what was started; Ray itself is stopped only if this
command started it.
"""

from __future__ import annotations

import argparse
import os

from orchestrator.commands.kv_flags import add_kv_arguments, kv_flags_problem


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register `pdserve up` options."""
    parser.add_argument("--prefill", type=int, default=1, help="prefill workers (default 1; 0: decode prefills)")
    parser.add_argument("--decode", type=int, default=1, help="decode workers (default 1)")
    parser.add_argument("--model", default=None,
                        help="Hugging Face model directory (Llama/Qwen2 safetensors); default: the tiny model")
    parser.add_argument("--cache-dir", default=None,
                        help="where the tiny model is created once (default: $PDSERVE_CACHE or ~/.cache/pdserve)")
    add_kv_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="HTTP interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000; 0 picks a free one)")
    parser.add_argument("--api-key", default=os.environ.get("PDSERVE_API_KEY"),
                        help="require this bearer token (default: $PDSERVE_API_KEY; unset: no auth)")
    parser.add_argument("--placement", choices=("pack", "spread"), default="pack",
                        help="a prefill/decode pair on one node (pack) or on different nodes (spread)")
    parser.add_argument("--address", default=None,
                        help="join this Ray cluster (e.g. ray://head:10001 or auto) instead of starting one")
    parser.add_argument("--kv-blocks", type=int, default=512,
                        help="KV cache blocks per worker (16 tokens each; default 512)")


def _validate(args: argparse.Namespace) -> str | None:
    if args.prefill < 0:
        return "--prefill must be >= 0"
    if args.decode < 1:
        return "--decode must be >= 1"
    if args.kv_blocks < 1:
        return "--kv-blocks must be >= 1"
    if not 0 <= args.port <= 65535:
        return "--port must be within 0..65535"
    return kv_flags_problem(args)


def main(args: argparse.Namespace) -> int:
    """Start the system, print the endpoint, serve until interrupted."""
    import signal
    import sys
    import threading

    from orchestrator.runtime.embedded import start_embedded
    from orchestrator.runtime.placement import PlacementStrategy

    problem = _validate(args)
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
        )
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"pdserve up: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"pdserve is serving {handle.model_dir.name} at {handle.url}/v1 (Ctrl-C to stop)", flush=True)
    print(f"  try: curl {handle.url}/v1/completions -H 'content-type: application/json' "
          f"-d '{{\"model\": \"{handle.model_dir.name}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'", flush=True)
    try:
        while not stop.wait(0.5):
            if not handle.server.running:
                print("pdserve up: the HTTP server stopped", file=sys.stderr)
                break
    finally:
        print("stopping ...", flush=True)
        handle.stop()
    return 0
