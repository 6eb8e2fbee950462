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

import sys
from pathlib import Path

from workers.native_build import CExtension

PURE_ENV = "PDSERVE_KV_PURE"
EXTENSION = CExtension(
    "workers.kv._copyhash", Path(__file__).resolve().parent / "_copyhash.c", "KV checksum kernel", PURE_ENV,
    "python -m workers.kv.native build",
)
load, build, clean = EXTENSION.load, EXTENSION.build, EXTENSION.clean

if __name__ == "__main__":
    sys.exit(EXTENSION.main(__doc__ or ""))
