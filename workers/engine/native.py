"""Optional compiled LM head of the CPU engine (``_lmhead.c``): logits over a panel-packed fp32 weight.

    python -m workers.engine.native build [--if-stale]   # compile (needs a C compiler)
    python -m workers.engine.native clean                # remove it; torch's matmul again
    python -m workers.engine.native status               # which path the LM head takes

Built in place (``workers/engine/_lmhead.*.so``, not tracked), loaded only when
built from the current source. Setting ``PDSERVE_ENGINE_PURE`` (non-empty,
not "0") ignores a build. ``workers.engine.lm_head`` says when the engine uses it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from workers.native_build import CExtension

PURE_ENV = "PDSERVE_ENGINE_PURE"
EXTENSION = CExtension(
    "workers.engine._lmhead", Path(__file__).resolve().parent / "_lmhead.c", "engine LM head kernel", PURE_ENV,
    "python -m workers.engine.native build",
)
load, build, clean = EXTENSION.load, EXTENSION.build, EXTENSION.clean

if __name__ == "__main__":
    sys.exit(EXTENSION.main(__doc__ or ""))
