"""Chooses, on import of ``simulations``, between the compiled build and the Python sources.

See ``simulations.native`` (which builds, cleans and reports) for what is compiled and why.
Only the standard library is used here: this runs on every import of the simulator.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
import sysconfig
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD_DIR = ROOT / "simulations" / "_compiled"
MANIFEST = BUILD_DIR / "BUILD.json"
# Package -> the modules of it that are compiled (the others stay Python: they are off the hot
# path, hold what mypyc cannot compile, or are not used by the simulator).
PACKAGES: dict[str, tuple[str, ...]] = {
    "simulations.sim": ("events", "types", "recorder", "runcost", "cost", "network", "instance", "cluster"),
    "orchestrator.core": ("types", "routing", "admission"),
}
# Name of mypyc's shared library for the group; it lives in the package (simulations.sim).
GROUP = "simulations.sim._native"
PURE_ENV = "PDSERVE_SIM_PURE"  # set (non-empty, not "0") to run pure Python even when built


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compiled_sources() -> dict[str, Path]:
    """Every compiled module's source file, by dotted name."""
    return {f"{pkg}.{m}": ROOT.joinpath(*pkg.split("."), f"{m}.py") for pkg, mods in PACKAGES.items() for m in mods}


def package_dir(package: str) -> Path:
    """Where the build keeps ``package``'s extensions."""
    return BUILD_DIR / package.split(".")[-1]


def build_key() -> dict[str, object]:
    """What a build depends on besides the sources: the interpreter's ABI."""
    return {"ext_suffix": sysconfig.get_config_var("EXT_SUFFIX"), "python": sys.implementation.cache_tag}


def compiled_state() -> tuple[bool, str]:
    """(usable, why): whether a build exists and matches the current sources and interpreter."""
    if not MANIFEST.exists():
        return False, "not built (python -m simulations.native build)"
    try:
        manifest = json.loads(MANIFEST.read_text())
    except (OSError, ValueError):
        return False, "unreadable build manifest; rebuild"
    if manifest.get("key") != build_key():
        return False, "built for another Python; rebuild"
    built = manifest.get("sources", {})
    sources = compiled_sources()
    if sorted(built) != sorted(sources):
        return False, "built from another module list; rebuild"
    stale = [name for name, path in sources.items() if digest(path) != built[name]]
    if stale:
        return False, f"stale build ({', '.join(stale)} changed since); rebuild"
    return True, "built from the current sources"


def activate() -> str:
    """Put the compiled modules first on their packages' paths when usable; return the mode."""
    if os.environ.get(PURE_ENV, "") not in ("", "0"):
        return "pure"
    usable, why = compiled_state()
    if usable:
        loaded = sorted(name for name in compiled_sources() if name in sys.modules)
        if loaded:
            usable, why = False, f"{', '.join(loaded)} imported before simulations"
    if not usable:
        if MANIFEST.exists():  # a build exists but cannot be used: say so rather than run slowly unnoticed
            warnings.warn(f"compiled simulator not used: {why}", RuntimeWarning, stacklevel=2)
        return "pure"
    for package in PACKAGES:
        if package != "simulations.sim":  # simulations.sim, not imported yet, does this itself
            importlib.import_module(package).__path__.insert(0, str(package_dir(package)))
    return "compiled"
