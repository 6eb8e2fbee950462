"""The --device flag that `pdserve up` and `pdserve quickstart` share, and its check."""

from __future__ import annotations

import argparse

DEVICES = ("cpu", "cuda")


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """Register --device."""
    parser.add_argument("--device", choices=DEVICES, default="cpu",
                        help="where workers run the model (default cpu). cuda: each worker on a GPU Ray gives it; "
                             "without --address the local Ray offers this machine's GPUs, shared evenly when "
                             "there are more workers than GPUs")


def device_problem(args: argparse.Namespace) -> str | None:
    """Why --device cannot work, when this process can tell before anything starts (None: it may)."""
    if args.device != "cuda" or getattr(args, "address", None) is not None:
        return None  # a cluster's workers check their own GPUs when they start
    from orchestrator.runtime.embedded import local_gpu_problem

    problem = local_gpu_problem()
    return None if problem is None else f"--device cuda: {problem}"
