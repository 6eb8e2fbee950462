"""pdserve simulator: replays real traces against a simulated cluster using orchestrator.core policies."""

from simulations._loader import activate

# "compiled" when the mypyc build (python -m simulations.native build) is present, matches the
# sources and could be put first on the package paths; else "pure" (the .py files run).
MODE = activate()
