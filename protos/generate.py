"""Regenerate (or check) the Python code of the protos under ``protos/pdserve``.

``python -m protos.generate`` writes ``*_pb2.py``, ``*_pb2_grpc.py`` and
``*_pb2.pyi`` next to each ``.proto`` with grpcio-tools' bundled protoc, then
rewrites the generated absolute imports (``from pdserve.v1 import ...``) to
package imports (``from protos.pdserve.v1 import ...``) so the code imports
from the repository root. ``--check`` regenerates into a temporary directory
and exits 1 when the checked-in files differ, naming them (CI runs it).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")
_IMPORT_RE = re.compile(r"^(\s*)from pdserve\.(\S+) import ", re.MULTILINE)


def proto_files(root: Path = PROTO_ROOT) -> list[Path]:
    """The ``.proto`` files under ``root/pdserve``, relative to ``root``, sorted."""
    return sorted(p.relative_to(root) for p in (root / "pdserve").rglob("*.proto"))


def _fix_imports(text: str) -> str:
    return _IMPORT_RE.sub(r"\1from protos.pdserve.\2 import ", text)


def generate(out_dir: Path, root: Path = PROTO_ROOT) -> list[Path]:
    """Compile every proto under ``root`` into ``out_dir``; return the files written (relative)."""
    import importlib.util
    import subprocess

    protos = proto_files(root)
    if not protos:
        raise SystemExit(f"no .proto files under {root / 'pdserve'}")
    spec = importlib.util.find_spec("grpc_tools")
    if spec is None or spec.origin is None:
        raise SystemExit("grpcio-tools is not installed: pip install -e '.[dev]'")
    include = Path(spec.origin).resolve().parent / "_proto"
    argv = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{root}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p) for p in protos),
    ]
    # A separate process: protoc's bundled C++ protobuf can crash a process that already
    # loaded torch, Ray and the upb protobuf runtime (seen in the full test session).
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"protoc failed with exit code {proc.returncode}: {proc.stderr.strip()}")
    written = sorted(p.relative_to(out_dir) for p in out_dir.rglob("*") if p.name.endswith(GENERATED_SUFFIXES))
    for rel in written:
        path = out_dir / rel
        path.write_text(_fix_imports(path.read_text()))
    return written


def _checked_in(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in (root / "pdserve").rglob("*") if p.name.endswith(GENERATED_SUFFIXES)}


def check(root: Path = PROTO_ROOT) -> list[str]:
    """Return a line per generated file that is missing, stale or extra (empty: up to date)."""
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        fresh = set(generate(Path(tmp), root))
        for rel in sorted(fresh):
            current = root / rel
            if not current.exists():
                problems.append(f"missing: {current}")
            elif current.read_bytes() != (Path(tmp) / rel).read_bytes():
                problems.append(f"stale: {current}")
        for rel in sorted(_checked_in(root) - fresh):
            problems.append(f"extra (no .proto produces it): {root / rel}")
    return problems


def main(argv: list[str] | None = None) -> int:
    """Command line: regenerate, or with ``--check`` verify, the generated code."""
    parser = argparse.ArgumentParser(prog="python -m protos.generate", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the checked-in generated code is not up to date"
    )
    args = parser.parse_args(argv)
    if args.check:
        problems = check()
        for line in problems:
            print(line, file=sys.stderr)
        if problems:
            print("run `python -m protos.generate` to regenerate", file=sys.stderr)
            return 1
        print("generated protobuf code is up to date")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        written = generate(Path(tmp))
        for rel in written:
            shutil.copyfile(Path(tmp) / rel, PROTO_ROOT / rel)
            print(f"wrote {PROTO_ROOT / rel}")
    for rel in sorted(_checked_in(PROTO_ROOT) - set(written)):
        (PROTO_ROOT / rel).unlink()
        print(f"removed stale {PROTO_ROOT / rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
