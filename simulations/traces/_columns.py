"""Fast column parsing shared by the CSV loaders.

The fast path converts whole columns with numpy; only when that fails does a
slow row-by-row pass run, to name the first bad line in the error.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from simulations.traces.errors import TraceFormatError


def _split_fast(path: Path, body: str, ncols: int) -> list[str] | None:
    """Flat field list of a body with no blank lines, after checking every line's field count."""
    if not body or "\n\n" in body or body.startswith("\n"):
        return None
    raw = np.frombuffer(body.encode("utf-8"), dtype=np.uint8)
    newlines = np.flatnonzero(raw == ord("\n"))
    commas = np.flatnonzero(raw == ord(","))
    per_line = np.diff(np.searchsorted(commas, newlines), prepend=0)
    bad = np.flatnonzero(per_line != ncols - 1)
    if len(bad):
        k = int(bad[0])
        raise TraceFormatError(
            path, f"expected {ncols} comma-separated fields, found {int(per_line[k]) + 1}", line=k + 2
        )
    return body[:-1].replace("\n", ",").split(",")


def read_csv_columns(
    path: Path, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> tuple[dict[str, list[str]], Sequence[int]]:
    """Split a headed CSV (no quoted fields) into named string columns, plus each row's 1-based line number."""
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    first, _, body = text.partition("\n")
    if not first.strip():
        raise TraceFormatError(path, "empty file, expected a header row", line=1)
    header = [h.strip() for h in first.split(",")]
    missing = [c for c in required if c not in header]
    if missing:
        raise TraceFormatError(path, f"header lacks column(s) {missing}; found {header}", line=1)
    ncols = len(header)
    wanted = [c for c in (*required, *optional) if c in header]
    if body and not body.endswith("\n"):
        body += "\n"
    flat = _split_fast(path, body, ncols)
    if flat is not None:
        rows = len(flat) // ncols
        return {c: flat[header.index(c) :: ncols] for c in wanted}, range(2, rows + 2)
    # Slow path for files with blank lines: skip them but keep true line numbers.
    lines = body.split("\n")
    line_numbers = [i + 2 for i, row in enumerate(lines) if row.strip()]
    split_rows = [lines[n - 2].split(",") for n in line_numbers]
    bad = next((k for k, r in enumerate(split_rows) if len(r) != ncols), None)
    if bad is not None:
        found = len(split_rows[bad])
        raise TraceFormatError(
            path, f"expected {ncols} comma-separated fields, found {found}", line=line_numbers[bad]
        )
    return {c: [r[header.index(c)] for r in split_rows] for c in wanted}, line_numbers


def parse_int_column(
    path: Path, field: str, values: list[str], line_numbers: Sequence[int], allow_negative: bool = False
) -> npt.NDArray[np.int64]:
    """Convert a column of decimal integers, rejecting non-numbers and (by default) negatives."""
    try:
        out = np.fromiter(map(int, values), dtype=np.int64, count=len(values))
    except (ValueError, OverflowError):
        for k, v in enumerate(values):
            try:
                int(v)
            except ValueError:
                raise TraceFormatError(
                    path, f"not an integer: {v!r}", line=line_numbers[k], field=field
                ) from None
        raise TraceFormatError(path, "cannot convert column to integers", field=field) from None
    if not allow_negative and len(out) and int(out.min()) < 0:
        k = int(np.flatnonzero(out < 0)[0])
        raise TraceFormatError(path, f"negative value {out[k]}", line=line_numbers[k], field=field)
    return out


def parse_float_column(
    path: Path, field: str, values: list[str], line_numbers: Sequence[int]
) -> npt.NDArray[np.float64]:
    """Convert a column of finite decimal numbers."""
    try:
        out = np.fromiter(map(float, values), dtype=np.float64, count=len(values))
    except ValueError:
        for k, v in enumerate(values):
            try:
                float(v)
            except ValueError:
                raise TraceFormatError(
                    path, f"not a number: {v!r}", line=line_numbers[k], field=field
                ) from None
        raise TraceFormatError(path, "cannot convert column to numbers", field=field) from None
    if len(out) and not bool(np.all(np.isfinite(out))):
        k = int(np.flatnonzero(~np.isfinite(out))[0])
        raise TraceFormatError(path, f"not finite: {values[k]!r}", line=line_numbers[k], field=field)
    return out


def sort_by_arrival(arrival_s: npt.NDArray[np.float64]) -> npt.NDArray[np.intp] | None:
    """Stable order that sorts arrivals, or None when they are already sorted."""
    if len(arrival_s) < 2 or bool(np.all(np.diff(arrival_s) >= 0)):
        return None
    return np.argsort(arrival_s, kind="stable")
