"""Mooncake (Kimi) FAST'25 JSONL traces.

One JSON object per line: ``timestamp`` (ms from trace start), ``input_length``,
``output_length`` and ``hash_ids`` (ids of the prompt's 512-token prefix
blocks; equal ids at equal positions are reusable KV). All four fields are
required; ``hash_ids`` is kept on the ``Trace``. Out-of-order rows are stably
sorted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from simulations.traces._columns import sort_by_arrival
from simulations.traces.errors import TraceFormatError
from simulations.traces.trace import Trace

MOONCAKE_BLOCK_TOKENS = 512  # tokens per hash_ids block in the published traces


def _int_field(path: Path, line: int, obj: dict[str, Any], key: str) -> int:
    if key not in obj:
        raise TraceFormatError(path, "missing field", line=line, field=key)
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise TraceFormatError(path, f"expected an integer, got {value!r}", line=line, field=key)
    if value < 0:
        raise TraceFormatError(path, f"negative value {value}", line=line, field=key)
    return value


def load_mooncake_jsonl(path: str | Path, name: str | None = None) -> Trace:
    """Load a Mooncake JSONL trace; arrivals in seconds from the earliest row, hash_ids kept."""
    p = Path(path)
    stamps_ms: list[float] = []
    prompt: list[int] = []
    output: list[int] = []
    hashes: list[tuple[int, ...]] = []
    with open(p, encoding="utf-8") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise TraceFormatError(p, f"invalid JSON: {exc.msg}", line=line_no) from None
            if not isinstance(obj, dict):
                raise TraceFormatError(p, "expected a JSON object", line=line_no)
            if "timestamp" not in obj:
                raise TraceFormatError(p, "missing field", line=line_no, field="timestamp")
            ts = obj["timestamp"]
            if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not np.isfinite(ts):
                raise TraceFormatError(
                    p, f"expected a number of ms, got {ts!r}", line=line_no, field="timestamp"
                )
            prompt.append(_int_field(p, line_no, obj, "input_length"))
            output.append(_int_field(p, line_no, obj, "output_length"))
            if "hash_ids" not in obj:
                raise TraceFormatError(p, "missing field", line=line_no, field="hash_ids")
            ids = obj["hash_ids"]
            if not isinstance(ids, list) or not all(
                isinstance(h, int) and not isinstance(h, bool) for h in ids
            ):
                raise TraceFormatError(p, "expected a list of integers", line=line_no, field="hash_ids")
            stamps_ms.append(float(ts))
            hashes.append(tuple(ids))
    ms = np.array(stamps_ms, dtype=np.float64)
    arrival_s = (ms - ms.min()) / 1000.0 if len(ms) else ms
    prompt_arr = np.array(prompt, dtype=np.int64)
    output_arr = np.array(output, dtype=np.int64)
    order = sort_by_arrival(arrival_s)
    if order is not None:
        arrival_s, prompt_arr, output_arr = arrival_s[order], prompt_arr[order], output_arr[order]
        hashes = [hashes[i] for i in order]
    return Trace(
        name=name or p.stem,
        arrival_s=arrival_s,
        prompt_tokens=prompt_arr,
        output_tokens=output_arr,
        hash_ids=tuple(hashes),
    )
