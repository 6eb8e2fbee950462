"""The compiled simulator (python -m simulations.native build) gives byte-identical results to pure Python."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from simulations import _loader as native

PROBE = Path(__file__).resolve().parent / "native_probe.py"


def _probe(pure: bool) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != native.PURE_ENV}
    if pure:
        env[native.PURE_ENV] = "1"
    done = subprocess.run([sys.executable, str(PROBE)], env=env, capture_output=True, text=True, timeout=240,
                          check=True)
    return done.stdout.splitlines()


@pytest.mark.slow
def test_compiled_and_pure_runs_are_byte_identical() -> None:
    usable, why = native.compiled_state()
    if not usable:
        pytest.skip(f"compiled simulator not available: {why}")
    compiled = _probe(pure=False)
    pure = _probe(pure=True)
    assert compiled[0] == "mode compiled" and pure[0] == "mode pure"
    assert len(compiled) == len(pure) == 10
    assert compiled[1:] == pure[1:]


def test_missing_stale_or_disabled_builds_fall_back_to_pure_python(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A fake tree: one package of two modules none of which is imported yet.
    package = tmp_path / "simulations" / "sim"
    package.mkdir(parents=True)
    for module in ("fake_a", "fake_b"):
        (package / f"{module}.py").write_text(f"# {module}\n")
    monkeypatch.setattr(native, "ROOT", tmp_path)
    monkeypatch.setattr(native, "BUILD_DIR", tmp_path / "build")
    monkeypatch.setattr(native, "MANIFEST", tmp_path / "build" / "BUILD.json")
    monkeypatch.setattr(native, "PACKAGES", {"simulations.sim": ("fake_a", "fake_b")})
    monkeypatch.delenv(native.PURE_ENV, raising=False)
    assert native.activate() == "pure"  # never built: no warning either

    native.BUILD_DIR.mkdir()
    sources = {name: native.digest(path) for name, path in native.compiled_sources().items()}
    assert sorted(sources) == ["simulations.sim.fake_a", "simulations.sim.fake_b"]
    native.MANIFEST.write_text(json.dumps({"key": native.build_key(), "sources": sources}))
    assert native.compiled_state() == (True, "built from the current sources")
    assert native.activate() == "compiled"

    monkeypatch.setenv(native.PURE_ENV, "1")
    assert native.activate() == "pure"
    monkeypatch.delenv(native.PURE_ENV)

    monkeypatch.setitem(sys.modules, "simulations.sim.fake_b", sys.modules[__name__])
    with pytest.warns(RuntimeWarning, match="fake_b imported before"):
        assert native.activate() == "pure"
    monkeypatch.delitem(sys.modules, "simulations.sim.fake_b")

    (package / "fake_a.py").write_text("# edited after the build\n")
    with pytest.warns(RuntimeWarning, match=r"stale build \(simulations.sim.fake_a changed"):
        assert native.activate() == "pure"
