"""The `pdserve` console script: a thin dispatcher over command modules.

Each command lives in its own module exposing ``add_arguments(parser)`` and
``main(args) -> int``. Command modules keep their top-level imports light
(argparse, typing) and import heavy dependencies inside ``main`` so that
``pdserve --help`` and unrelated commands stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("orchestrator.commands.quickstart", "run the main job on the embedded default"),
    "up": ("orchestrator.commands.up", "run prefill/decode workers, controller and OpenAI API until Ctrl-C"),
    "generate": ("workers.commands.generate", "disaggregated generation between two local processes"),
    "profile": ("simulations.profile_cmd", "measure engine step times and write a latency profile for the simulator"),
    "bench": ("orchestrator.commands.bench", "replay a real trace against an OpenAI endpoint, report SLO attainment"),
    "simulate": ("simulations.commands.simulate", "replay a trace against a simulated cluster (TTFT/TPOT/SLO, plots)"),
    "goodput": ("simulations.commands.goodput", "per-GPU goodput placement search: colocated vs prefill/decode splits"),
}


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with one sub-parser per registered command."""
    parser = argparse.ArgumentParser(prog="pdserve", description="Disaggregated prefill/decode LLM serving.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and module_name.startswith(exc.name):
                continue  # command not built in this installation
            raise
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pdserve` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_module", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args._module.main(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
