"""Optional compiled kernel of the KV transports: copy and checksum in one pass (``_copyhash.c``).

    python -m workers.kv.native build [--if-stale]   # compile (needs a C compiler)
    python -m workers.kv.native clean                # remove it; numpy + xxhash again
    python -m workers.kv.native status               # which path the checksums take

The kernel computes the same xxh3-64 digests as the ``xxhash`` package, so a
process with it and one without interoperate; it only makes copy+checksum
one pass over memory instead of a copy and a hash. The extension is built in
place (``workers/kv/_copyhash.*.so``, not tracked) and carries the SHA-256 of
the source it was built from: a build from an older source is not loaded.
Setting ``PDSERVE_KV_PURE`` (non-empty, not "0") ignores a build, e.g. to
compare the two paths.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "_copyhash.c"
MODULE = "workers.kv._copyhash"
PURE_ENV = "PDSERVE_KV_PURE"


def source_digest() -> str:
    """SHA-256 of the kernel's C source."""
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()


def built_paths() -> list[Path]:
    """Extension files of the kernel present in the package directory."""
    return sorted(p for suffix in importlib.machinery.EXTENSION_SUFFIXES for p in HERE.glob(f"_copyhash{suffix}"))


def load(honour_pure_env: bool = True) -> tuple[ModuleType | None, str]:
    """(module, why): the kernel when a build of the current source exists, else None."""
    if honour_pure_env and os.environ.get(PURE_ENV, "") not in ("", "0"):
        return None, f"not used ({PURE_ENV} is set)"
    spec = importlib.util.find_spec(MODULE) if built_paths() else None
    if spec is None:
        return None, "not built (python -m workers.kv.native build)"
    if not SOURCE.exists():
        return None, f"{SOURCE.name} is missing, so a build cannot be checked against it"
    try:
        module = importlib.import_module(MODULE)
    except ImportError as exc:
        return None, f"cannot load the build: {exc}"
    if getattr(module, "SOURCE_DIGEST", "") != source_digest():
        warnings.warn("compiled KV checksum kernel is stale; rebuild with python -m workers.kv.native build",
                      RuntimeWarning, stacklevel=2)
        return None, "stale build (the C source changed since); rebuild"
    return module, f"compiled ({module.ISA})"


def build(verbose: bool = False) -> None:
    """Compile the kernel with the interpreter's C compiler settings into the package directory."""
    import shutil
    import tempfile

    from setuptools import Distribution, Extension

    extension = Extension(
        MODULE, [str(SOURCE)], define_macros=[("PD_SOURCE_DIGEST", f'"{source_digest()}"')],
        extra_compile_args=["-O3", "-std=c11", "-Wall"],
    )
    with tempfile.TemporaryDirectory(prefix="pdserve-copyhash-") as tmp:
        dist = Distribution({"name": "pdserve-kv-native", "ext_modules": [extension]})
        cmd = dist.get_command_obj("build_ext")
        cmd.build_lib = str(Path(tmp) / "lib")  # type: ignore[attr-defined]
        cmd.build_temp = str(Path(tmp) / "tmp")  # type: ignore[attr-defined]
        cmd.verbose = verbose  # type: ignore[attr-defined]
        cmd.ensure_finalized()
        cmd.run()
        built = list((Path(tmp) / "lib").rglob("_copyhash*"))
        if len(built) != 1:
            raise RuntimeError(f"expected one extension, the build made {built}")
        clean()
        shutil.copy2(built[0], HERE / built[0].name)


def clean() -> None:
    """Remove every build of the kernel."""
    for path in built_paths():
        path.unlink()


def main(argv: list[str] | None = None) -> int:
    """Command line: build, clean or status."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("build", "clean", "status"))
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--if-stale", action="store_true", help="build only when no current build exists")
    args = parser.parse_args(argv)
    if args.action == "build" and not (args.if_stale and load(honour_pure_env=False)[0] is not None):
        build(args.verbose)
    elif args.action == "clean":
        clean()
    print(f"KV checksum kernel: {load()[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
