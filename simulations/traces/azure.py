"""Azure LLM inference traces (2023 Splitwise and 2024 week-long DynamoLLM).

Both are ``TIMESTAMP,ContextTokens,GeneratedTokens`` CSVs with one request
per row. 2023 timestamps look like ``2023-11-16 18:17:03.9799600`` (7
fractional digits, no zone); 2024 ones like ``2024-05-12
00:00:00.001163+00:00`` and sometimes lack the fraction. Zone offsets are
applied (everything becomes UTC) and arrivals are seconds from the earliest
row. Rows out of time order are stably sorted, not rejected: the trace is a
log of arrivals and its order carries no other meaning.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from simulations.traces._columns import parse_int_column, read_csv_columns, sort_by_arrival
from simulations.traces.errors import TraceFormatError
from simulations.traces.trace import Trace

AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


_ZONE_RE = re.compile(r"(?:[+-]\d\d:\d\d|Z)$", flags=re.MULTILINE)
_UTC_ZONES = {"+00:00", "-00:00", "Z"}


def _split_zones(
    path: Path, values: list[str], line_numbers: Sequence[int]
) -> tuple[list[str], npt.NDArray[np.int64] | None]:
    """Timestamps without their zone suffix, and per-row UTC offsets in seconds (None when all are UTC)."""
    joined = "\n".join(values)
    # Cheap exit for zone-less files: a date has exactly two dashes; the regex scan is 10x slower.
    if "+" not in joined and "Z" not in joined and joined.count("-") == 2 * len(values):
        return values, None
    if joined.count("+00:00\n") + joined.endswith("+00:00") == len(values):  # every row in UTC
        return joined.replace("+00:00", "").split("\n"), None
    zones = set(_ZONE_RE.findall(joined))
    if not zones:
        return values, None
    if zones <= _UTC_ZONES:
        return _ZONE_RE.sub("", joined).split("\n"), None
    bases = []
    offsets = np.zeros(len(values), dtype=np.int64)
    for k, s in enumerate(values):
        match = _ZONE_RE.search(s)
        if match is None:
            bases.append(s)
            continue
        zone = match.group(0)
        if zone != "Z":
            sign = -1 if zone[0] == "-" else 1
            offsets[k] = sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
        bases.append(s[: match.start()])
    return bases, offsets


def parse_timestamps_ns(path: Path, values: list[str], line_numbers: Sequence[int]) -> npt.NDArray[np.int64]:
    """Parse ISO-like wall-clock timestamps (optional fraction, optional ±HH:MM or Z) to UTC nanoseconds."""
    bases, offsets_s = _split_zones(path, values, line_numbers)
    try:
        ns = np.array(bases, dtype="datetime64[ns]").astype(np.int64)
    except ValueError:
        for k, s in enumerate(bases):
            try:
                np.datetime64(s, "ns")
            except ValueError:
                raise TraceFormatError(
                    path, f"not a timestamp: {values[k]!r}", line=line_numbers[k], field="TIMESTAMP"
                ) from None
        raise TraceFormatError(path, "cannot parse timestamps", field="TIMESTAMP") from None
    if offsets_s is not None:
        ns = ns - offsets_s * 1_000_000_000
    return ns


def load_azure_csv(path: str | Path, name: str | None = None) -> Trace:
    """Load an Azure 2023 or 2024 LLM inference CSV; arrivals in seconds from the earliest row."""
    p = Path(path)
    columns, line_numbers = read_csv_columns(p, AZURE_COLUMNS)
    ns = parse_timestamps_ns(p, columns["TIMESTAMP"], line_numbers)
    prompt = parse_int_column(p, "ContextTokens", columns["ContextTokens"], line_numbers)
    output = parse_int_column(p, "GeneratedTokens", columns["GeneratedTokens"], line_numbers)
    arrival_s = (ns - ns.min()).astype(np.float64) / 1e9 if len(ns) else np.zeros(0)
    order = sort_by_arrival(arrival_s)
    if order is not None:
        arrival_s, prompt, output = arrival_s[order], prompt[order], output[order]
    return Trace(name=name or p.stem, arrival_s=arrival_s, prompt_tokens=prompt, output_tokens=output)
