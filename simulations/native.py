"""Optional compiled simulator: its hot modules and the core policies it calls, built with mypyc.

    python -m simulations.native build    # compile (needs mypy's mypyc and a C compiler)
    python -m simulations.native build --if-stale   # only when sources changed since
    python -m simulations.native clean    # remove the build; pure Python again
    python -m simulations.native status   # which mode the simulator would run in

Compiled: ``simulations/sim``'s event loop, instances, network, cluster, costs and recorder,
plus ``orchestrator.core``'s types, routing and admission (their data classes stay plain
Python classes, see ``orchestrator.core._plain``). The same sources run either way, with
byte-identical results (tests/sim/test_sim_native.py); compiled they run about 2.5x faster
(benchmarks/sim_speed.py prints both).

Extensions go to ``simulations/_compiled/`` with a manifest of the sources' hashes.
Importing ``simulations`` puts them first on the package paths of ``simulations.sim`` and
``orchestrator.core`` only when every hash matches the current sources (a stale build would
silently run old code), ``PDSERVE_SIM_PURE`` is unset, and none of those core modules was
imported already (the compiled modules call each other directly, so they must all come from
one build). Otherwise everything runs the ``.py`` files. The live router does not import
``simulations`` and so runs the Python core; a process that imports ``simulations`` first
(e.g. benchmarks/twin.py) runs the compiled core throughout, with unchanged results, and
data classes that pickle and compare as before.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from simulations._loader import (
    BUILD_DIR,
    GROUP,
    MANIFEST,
    PACKAGES,
    PURE_ENV,
    ROOT,
    build_key,
    compiled_sources,
    compiled_state,
    digest,
    package_dir,
)

__all__ = ["build", "clean", "compiled_state", "main"]


def build(verbose: bool = False) -> None:
    """Compile the modules of ``PACKAGES`` with mypyc into ``BUILD_DIR`` (replacing any previous build)."""
    import shutil
    import tempfile

    from mypyc.build import mypycify
    from setuptools import Distribution

    sources = {name: digest(path) for name, path in compiled_sources().items()}
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="pdserve-mypyc-") as tmp:
        os.chdir(ROOT)  # mypy reads the project's config and resolves modules from the root
        try:
            files = [str(path.relative_to(ROOT)) for path in compiled_sources().values()]
            extensions = mypycify(files, opt_level="3", target_dir=os.path.join(tmp, "c"), group_name=GROUP,
                                  verbose=verbose)
            dist = Distribution({"name": "pdserve-sim-native", "ext_modules": extensions})
            cmd = dist.get_command_obj("build_ext")
            cmd.build_lib = os.path.join(tmp, "lib")  # type: ignore[attr-defined]
            cmd.build_temp = os.path.join(tmp, "tmp")  # type: ignore[attr-defined]
            cmd.ensure_finalized()
            cmd.run()
        finally:
            os.chdir(cwd)
        lib = Path(tmp) / "lib"
        built = {package: sorted(lib.joinpath(*package.split(".")).glob("*.so")) for package in PACKAGES}
        # One extension per module, plus the group's shared library (which lives in GROUP's package).
        want = {package: len(mods) + (package == GROUP.rpartition(".")[0]) for package, mods in PACKAGES.items()}
        if {package: len(found) for package, found in built.items()} != want:
            raise RuntimeError(f"mypyc built {built}, expected {want} extensions per package")
        clean()
        for package, found in built.items():
            package_dir(package).mkdir(parents=True)
            for path in found:
                shutil.copy2(path, package_dir(package) / path.name)
    MANIFEST.write_text(json.dumps({"key": build_key(), "sources": sources}, indent=1, sort_keys=True) + "\n")


def clean() -> None:
    """Remove the compiled build (the simulator runs pure Python afterwards)."""
    import shutil

    if BUILD_DIR.exists():
        shutil.rmtree(BUILD_DIR)


def main(argv: list[str] | None = None) -> int:
    """Command line: build, clean or status."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("build", "clean", "status"))
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--if-stale", action="store_true", help="build only when no usable build exists")
    args = parser.parse_args(argv)
    if args.action == "build" and not (args.if_stale and compiled_state()[0]):
        build(args.verbose)
    elif args.action == "clean":
        clean()
    usable, why = compiled_state()
    pure_forced = os.environ.get(PURE_ENV, "") not in ("", "0")
    mode = "compiled" if usable and not pure_forced else "pure"
    print(f"simulator: {mode} ({why}{'; ' + PURE_ENV + ' is set' if pure_forced else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
