"""BurstGPT CSV traces (Azure OpenAI GPT usage at a campus, KDD '25).

Header ``Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type``;
newer files add ``Session ID`` and ``Elapsed time`` (any column order is
accepted, columns are found by name). ``Timestamp`` is seconds from midnight
of the first day; arrivals are made relative to the earliest row. Rows with
``Response tokens == 0`` are failed requests: they are kept and flagged in
``Trace.failed`` unless ``drop_failed=True``. Out-of-order rows are stably
sorted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from simulations.traces._columns import (
    parse_float_column,
    parse_int_column,
    read_csv_columns,
    sort_by_arrival,
)
from simulations.traces.trace import Trace

BURSTGPT_COLUMNS = ("Timestamp", "Model", "Request tokens", "Response tokens", "Total tokens", "Log Type")


def load_burstgpt_csv(
    path: str | Path, name: str | None = None, drop_failed: bool = False, model: str | None = None
) -> Trace:
    """Load a BurstGPT CSV; ``drop_failed`` removes zero-response rows, ``model`` keeps one model's rows."""
    p = Path(path)
    columns, line_numbers = read_csv_columns(p, BURSTGPT_COLUMNS)
    stamps = parse_float_column(p, "Timestamp", columns["Timestamp"], line_numbers)
    prompt = parse_int_column(p, "Request tokens", columns["Request tokens"], line_numbers)
    output = parse_int_column(p, "Response tokens", columns["Response tokens"], line_numbers)
    keep = np.ones(len(stamps), dtype=np.bool_)
    if model is not None:
        keep &= np.array([m.strip() == model for m in columns["Model"]], dtype=np.bool_)
    failed = output == 0
    if drop_failed:
        keep &= ~failed
    stamps, prompt, output, failed = stamps[keep], prompt[keep], output[keep], failed[keep]
    arrival_s = stamps - stamps.min() if len(stamps) else stamps
    order = sort_by_arrival(arrival_s)
    if order is not None:
        arrival_s, prompt, output, failed = arrival_s[order], prompt[order], output[order], failed[order]
    return Trace(
        name=name or p.stem, arrival_s=arrival_s, prompt_tokens=prompt, output_tokens=output, failed=failed
    )
