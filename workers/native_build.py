"""The workers' optional C extensions: built in place next to their source, loaded only while current.

A build carries the SHA-256 of the source it was compiled from (the ``PD_SOURCE_DIGEST`` macro,
exported as ``SOURCE_DIGEST``): a build from an older source is not loaded, and the caller falls
back to its Python path. An environment switch (``pure_env``, non-empty and not "0") ignores a
build, e.g. to compare the two paths. ``workers.kv.native`` and ``workers.engine.native`` are the
command lines of the two extensions.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import importlib.machinery
import importlib.util
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType


def source_digest(source: Path) -> str:
    """SHA-256 of a C source."""
    return hashlib.sha256(source.read_bytes()).hexdigest()


def built_paths(directory: Path, stem: str) -> list[Path]:
    """Extension files named ``stem`` in ``directory``."""
    return sorted(p for suffix in importlib.machinery.EXTENSION_SUFFIXES for p in directory.glob(f"{stem}{suffix}"))


@contextlib.contextmanager
def isa_forced(kernel: ModuleType, name: str) -> Iterator[bool]:
    """Run a loaded extension's loops on instruction set ``name`` inside the block (False: not available here).

    Both extensions pick the widest set the CPU has at import and switch with ``use_isa(name)``,
    which refuses a set the CPU lacks or the extension does not have; the tests compare the sets
    through this, and the set in effect before the block is restored on leaving.
    """
    default = kernel.ISA
    try:
        kernel.use_isa(name)
    except ValueError:
        yield False
        return
    try:
        yield True
    finally:
        kernel.use_isa(default)


@dataclass
class CExtension:
    """One optional extension: its module name, its C source, and how to name it in messages."""

    module: str  # dotted name, e.g. "workers.kv._copyhash"; built into the source's directory
    source: Path  # the C file
    title: str  # e.g. "KV checksum kernel"
    pure_env: str  # environment switch that ignores a build
    command: str  # the command line that builds it, for messages

    @property
    def stem(self) -> str:
        """The module's file name without its extension suffix."""
        return self.module.rsplit(".", 1)[1]

    def built_paths(self) -> list[Path]:
        """Builds of the extension present next to its source."""
        return built_paths(self.source.parent, self.stem)

    def load(self, honour_pure_env: bool = True) -> tuple[ModuleType | None, str]:
        """(module, why): the extension when a build of the current source exists, else None."""
        if honour_pure_env and os.environ.get(self.pure_env, "") not in ("", "0"):
            return None, f"not used ({self.pure_env} is set)"
        spec = importlib.util.find_spec(self.module) if self.built_paths() else None
        if spec is None:
            return None, f"not built ({self.command})"
        if not self.source.exists():
            return None, f"{self.source.name} is missing, so a build cannot be checked against it"
        try:
            module = importlib.import_module(self.module)
        except ImportError as exc:
            return None, f"cannot load the build: {exc}"
        if getattr(module, "SOURCE_DIGEST", "") != source_digest(self.source):
            warnings.warn(f"compiled {self.title} is stale; rebuild with {self.command}", RuntimeWarning, stacklevel=2)
            return None, "stale build (the C source changed since); rebuild"
        return module, f"compiled ({module.ISA})"

    def build(self, verbose: bool = False) -> None:
        """Compile the source with the interpreter's C compiler settings into the source's directory."""
        from setuptools import Distribution, Extension

        extension = Extension(
            self.module, [str(self.source)], define_macros=[("PD_SOURCE_DIGEST", f'"{source_digest(self.source)}"')],
            extra_compile_args=["-O3", "-std=c11", "-Wall"], libraries=["m"],
        )
        name = f"pdserve-{self.stem.lstrip('_')}"
        with tempfile.TemporaryDirectory(prefix=f"{name}-") as tmp:
            dist = Distribution({"name": name, "ext_modules": [extension]})
            cmd = dist.get_command_obj("build_ext")
            cmd.build_lib = str(Path(tmp) / "lib")  # type: ignore[attr-defined]
            cmd.build_temp = str(Path(tmp) / "tmp")  # type: ignore[attr-defined]
            cmd.verbose = verbose  # type: ignore[attr-defined]
            cmd.ensure_finalized()
            cmd.run()
            built = list((Path(tmp) / "lib").rglob(f"{self.stem}*"))
            if len(built) != 1:
                raise RuntimeError(f"expected one extension, the build made {built}")
            self.clean()
            shutil.copy2(built[0], self.source.parent / built[0].name)

    def clean(self) -> None:
        """Remove every build of the extension."""
        for path in self.built_paths():
            path.unlink()

    def main(self, description: str, argv: list[str] | None = None) -> int:
        """Command line: build, clean or status."""
        parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("action", choices=("build", "clean", "status"))
        parser.add_argument("-v", "--verbose", action="store_true")
        parser.add_argument("--if-stale", action="store_true", help="build only when no current build exists")
        args = parser.parse_args(argv)
        if args.action == "build" and not (args.if_stale and self.load(honour_pure_env=False)[0] is not None):
            self.build(args.verbose)
        elif args.action == "clean":
            self.clean()
        print(f"{self.title}: {self.load()[1]}")
        return 0
