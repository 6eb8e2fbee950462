"""The columnar ``Trace``: one request per row, sorted by arrival time.

Columns are numpy arrays so a million-request trace costs tens of MB, not a
million Python objects. ``hash_ids`` (prefix-cache block hashes, Mooncake) is
optional and kept as a tuple of tuples only when the source has it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class Trace:
    """Requests of one workload: arrival time (s from start), prompt and output lengths."""

    name: str
    arrival_s: npt.NDArray[np.float64]
    prompt_tokens: npt.NDArray[np.int64]
    output_tokens: npt.NDArray[np.int64]
    hash_ids: tuple[tuple[int, ...], ...] | None = None
    # True for rows the source marks as failed (BurstGPT zero-response rows).
    failed: npt.NDArray[np.bool_] | None = field(default=None)

    def __post_init__(self) -> None:
        n = len(self.arrival_s)
        if len(self.prompt_tokens) != n or len(self.output_tokens) != n:
            raise ValueError(f"trace {self.name!r}: column lengths differ")
        if self.hash_ids is not None and len(self.hash_ids) != n:
            raise ValueError(f"trace {self.name!r}: hash_ids has {len(self.hash_ids)} rows, expected {n}")
        if n > 1 and bool(np.any(np.diff(self.arrival_s) < 0)):
            raise ValueError(f"trace {self.name!r}: arrivals are not sorted")

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def duration_s(self) -> float:
        """Time from the first to the last arrival."""
        return float(self.arrival_s[-1] - self.arrival_s[0]) if len(self) else 0.0
