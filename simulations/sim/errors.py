"""Exceptions of the simulator (kept out of compiled modules: mypyc cannot subclass builtin exceptions)."""

from __future__ import annotations


class ConservationError(RuntimeError):
    """A request was lost or completed twice: the simulator is wrong, not the workload."""
