#!/usr/bin/env bash
# pdserve developer entry point: one command sets up .venv (once) and runs a job.
#   scripts/dev.sh demo   the main job on the embedded default
#   scripts/dev.sh test   linters, import contracts, generated-code check, the test suite
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${PDSERVE_VENV:-.venv}
PY="$VENV/bin/python"

setup() {
  [ -x "$PY" ] || python3 -m venv "$VENV"
  # A bare torch requirement would pull a multi-GB CUDA build; take the CPU wheel first.
  if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install -q torch==2.13.0
  fi
  local stamp="$VENV/.pdserve-installed" want
  want=$(sha256sum pyproject.toml | cut -d' ' -f1)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    "$PY" -m pip install -q -e ".[dev]"
    # NIXL is an optional KV backend; its `nixl` wrapper must come without dependencies.
    # Where it installs, its transport tests run; where it cannot, they skip and say so.
    if ! { "$PY" -m pip install -q -e ".[nixl]" && "$PY" -m pip install -q --no-deps nixl==1.5.1; }; then
      echo "warning: optional NIXL backend not installed; its tests will be skipped" >&2
    fi
    echo "$want" >"$stamp"
  fi
  # The simulator's optional compiled modules (mypyc); without them it runs as pure Python.
  "$PY" -m simulations.native build --if-stale >/dev/null 2>&1 \
    || echo "warning: compiled simulator not built; it runs as pure Python" >&2
  # The KV transports' fused copy+checksum kernel (C); without it they copy and hash in two steps.
  "$PY" -m workers.kv.native build --if-stale >/dev/null 2>&1 \
    || echo "warning: KV checksum kernel not built; transports use numpy + xxhash" >&2
  # The CPU engine's LM head kernel (C); without it the logits take torch's matmul.
  "$PY" -m workers.engine.native build --if-stale >/dev/null 2>&1 \
    || echo "warning: engine LM head kernel not built; logits use torch's matmul" >&2
}

export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
cmd=${1:-}
shift || true
case "$cmd" in
  demo)
    setup
    "$VENV/bin/pdserve" quickstart "$@"
    ;;
  test)
    setup
    "$VENV/bin/ruff" check .
    "$VENV/bin/lint-imports"
    "$PY" -m protos.generate --check
    "$VENV/bin/mypy" orchestrator workers simulations
    "$PY" -m pytest -q "$@"
    ;;
  *)
    echo "usage: scripts/dev.sh demo|test [args...]" >&2
    exit 2
    ;;
esac
