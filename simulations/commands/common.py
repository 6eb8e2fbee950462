"""Arguments shared by the simulator's commands (light imports only)."""

from __future__ import annotations

import argparse


def add_workload_arguments(parser: argparse.ArgumentParser, default_limit: int | None = None) -> None:
    """--trace, --limit, --sample, --seed, --latency and the SLO.

    ``default_limit`` is only documented here; the command applies it (see ``workload_limit``).
    """
    parser.add_argument("--trace", required=True,
                        help="trace name (azure-conv, azure-code, mooncake-conv, ...) or a file path")
    limit_help = "use only the first N requests"
    if default_limit is not None:
        limit_help += f" (default: {default_limit} when neither --limit nor --sample is given)"
    parser.add_argument("--limit", type=int, default=None, help=limit_help)
    parser.add_argument("--sample", type=int, default=None, help="use a random subset of N requests (see --seed)")
    parser.add_argument("--seed", type=int, default=0, help="seed for --sample (runs are otherwise deterministic)")
    parser.add_argument("--latency", default="roofline:a100-80gb:llama-2-13b",
                        help="roofline:GPU:MODEL | profile:FILE | table:FILE | fixed:SECONDS | zero")
    parser.add_argument("--ttft-slo", type=float, default=0.25, help="TTFT target in seconds (DistServe chatbot: 0.25)")
    parser.add_argument("--tpot-slo", type=float, default=0.1, help="TPOT target in seconds (DistServe chatbot: 0.1)")
    parser.add_argument("--attainment", type=float, default=0.9, help="fraction of requests that must meet both SLOs")


def workload_limit(args: argparse.Namespace, default_limit: int) -> int | None:
    """--limit, or ``default_limit`` when neither --limit nor --sample is given (--sample alone is not cut)."""
    if args.limit is None and args.sample is None:
        return default_limit
    return args.limit


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """Batching, KV and network knobs shared by every cluster."""
    parser.add_argument("--policy", choices=("prefill_first", "chunked"), default="prefill_first",
                        help="batching of colocated instances: vLLM-like prefill-first or Sarathi-like chunked")
    parser.add_argument("--max-batched-tokens", type=int, default=8192,
                        help="per-step token budget (chunked) / max prefill tokens per step")
    parser.add_argument("--max-running", type=int, default=256, help="max running decodes per instance")
    parser.add_argument("--kv-blocks", type=int, default=None,
                        help="KV blocks per instance (default: from the GPU and model, else 4096)")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    parser.add_argument("--kv-bytes-per-token", type=float, default=None,
                        help="KV bytes per token for transfers (default: the model's for roofline latency, the "
                             "profile's for profile/table files that record it, else 0; 0 = instant)")
    parser.add_argument("--inter-node-gbps", type=float, default=25.0, help="NIC bandwidth per direction (GB/s)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node for placement")
    parser.add_argument("--short-prompt-tokens", type=int, default=32,
                        help="routing: prompts up to this many tokens prefill on the decode instance")
    parser.add_argument("--router-refresh-s", type=float, default=None,
                        help="seconds between refreshes of the router's view of the instances' loads; in "
                             "between, each routing decision is booked into the view, as the live router does "
                             "(default: the live router's interval, 0.2; 0 = perfect, instant information)")


def at_least(flag: str, value: float | None, low: float) -> None:
    """Raise ValueError naming ``flag`` unless ``value`` (when given) is >= ``low``."""
    if value is not None and not value >= low:  # `not >=` also rejects NaN
        raise ValueError(f"{flag} must be >= {low:g}, got {value:g}")


def knobs_from_args(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """ClusterKnobs from parsed arguments; raises ValueError naming the flag of a bad value."""
    from dataclasses import replace

    from simulations.experiments.specs import ClusterKnobs
    from simulations.sim.instance import BatchPolicy

    # Checked here so the message names the flag, before any instance is built or any run starts.
    for flag, value in (("--block-size", args.block_size), ("--max-batched-tokens", args.max_batched_tokens),
                        ("--max-running", args.max_running), ("--kv-blocks", args.kv_blocks),
                        ("--gpus-per-node", args.gpus_per_node)):
        at_least(flag, value, 1)
    at_least("--short-prompt-tokens", args.short_prompt_tokens, 0)
    if not args.inter_node_gbps > 0:
        raise ValueError(f"--inter-node-gbps must be > 0, got {args.inter_node_gbps:g}")
    knobs = ClusterKnobs(
        block_size=args.block_size, max_batched_tokens=args.max_batched_tokens,
        max_running_requests=args.max_running, colocated_policy=BatchPolicy(args.policy),
        kv_blocks=args.kv_blocks, gpus_per_node=args.gpus_per_node, inter_node_gbps=args.inter_node_gbps,
        short_prompt_tokens=args.short_prompt_tokens,
    )
    if args.router_refresh_s is not None:
        knobs = replace(knobs, router_refresh_s=args.router_refresh_s)
    return knobs


def latency_from_args(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """LatencySetup from --latency, honouring --kv-bytes-per-token."""
    from dataclasses import replace

    from simulations.experiments.specs import load_latency

    at_least("--kv-bytes-per-token", args.kv_bytes_per_token, 0)
    setup = load_latency(args.latency, args.kv_bytes_per_token)
    if args.kv_bytes_per_token is not None:
        setup = replace(setup, kv_bytes_per_token=args.kv_bytes_per_token)
    return setup
