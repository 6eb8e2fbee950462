"""The one error every trace loader raises for bad input: it names file, line and field."""

from __future__ import annotations

from pathlib import Path


class TraceFormatError(ValueError):
    """A trace file is malformed; ``path``, ``line`` (1-based, when known) and ``field`` say where."""

    def __init__(self, path: str | Path, message: str, line: int | None = None, field: str | None = None):
        self.path = str(path)
        self.line = line
        self.field = field
        where = self.path if line is None else f"{self.path}:{line}"
        what = f" field {field!r}:" if field is not None else ""
        super().__init__(f"{where}:{what} {message}")
