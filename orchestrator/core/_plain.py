"""``plain``: keeps a class an ordinary Python class when its module is compiled with mypyc.

The simulator may compile the core's policy modules for speed (``simulations.native``);
their functions become native code, while data classes marked ``plain`` stay interpreted
classes, so they pickle, ``dataclasses.replace`` and behave exactly as in pure Python.
"""

from typing import TypeVar

T = TypeVar("T")


def plain(cls: T) -> T:
    """Return ``cls`` unchanged (mypyc compiles a class with an unknown decorator as a Python class)."""
    return cls
