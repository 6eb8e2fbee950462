"""The KV transport flags that `pdserve up` and `pdserve quickstart` share, and their check."""

from __future__ import annotations

import argparse
import importlib.util


def add_kv_arguments(parser: argparse.ArgumentParser) -> None:
    """Register --transport, --kv-poll-us and --kv-tcp-congestion."""
    parser.add_argument("--transport", choices=("tcp", "shm", "torch_dist", "nixl"), default="tcp",
                        help="how KV moves from prefill to decode workers (default tcp; nixl needs the optional NIXL "
                             "packages on every worker)")
    parser.add_argument("--kv-poll-us", type=float, default=None,
                        help="microseconds a shm or tcp KV receiver polls before it sleeps in recv (default 100; 0: "
                             "sleep at once)")
    parser.add_argument("--kv-tcp-congestion", default=None,
                        help="TCP congestion control of tcp KV connections: auto (default: reno where the decode "
                             "worker is on the prefill worker's host), system (the host's), or a name such as cubic")


def _nixl_installed() -> bool:
    try:
        return importlib.util.find_spec("nixl") is not None
    except ValueError:  # a module entry without a spec: as good as absent
        return False


def kv_flags_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the KV flags, before anything starts (None: nothing)."""
    from workers.kv.congestion import AUTO, SYSTEM, host_refusal, validate_choice
    from workers.kv.errors import NIXL_INSTALL
    from workers.kv.interface import EndpointOptions

    if args.transport == "nixl" and not _nixl_installed():
        return f"--transport nixl needs NIXL: {NIXL_INSTALL}"
    if args.kv_poll_us is not None:
        try:
            EndpointOptions(poll_us=args.kv_poll_us)
        except ValueError:
            return "--kv-poll-us must be a finite number >= 0"
    if args.kv_tcp_congestion is not None:
        try:
            validate_choice(args.kv_tcp_congestion)
        except ValueError as exc:
            return f"--kv-tcp-congestion: {exc}"
        if args.kv_tcp_congestion not in (AUTO, SYSTEM):
            # Only this host's lists are readable here; a remote worker still refuses a name its kernel lacks.
            refused = host_refusal(args.kv_tcp_congestion)
            if refused is not None:
                return f"--kv-tcp-congestion {refused}"
    return None
