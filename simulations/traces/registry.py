"""``load_trace``: one entry point that finds a trace by name or path and detects its format.

Names resolve under the traces folder: ``$PDSERVE_TRACES_DIR`` when set,
else ``<project root>/../shared/traces``. Detection: a folder of
``chunk-<id>-trace.csv`` files is ServeGen; a file whose first non-blank line
starts with ``{`` is Mooncake JSONL; a CSV whose header has ``ContextTokens``
is Azure, one with ``Request tokens`` is BurstGPT.
"""

from __future__ import annotations

import enum
import os
from pathlib import Path
from typing import Any

from simulations.traces.azure import load_azure_csv
from simulations.traces.burstgpt import load_burstgpt_csv
from simulations.traces.errors import TraceFormatError
from simulations.traces.mooncake import load_mooncake_jsonl
from simulations.traces.servegen import generate_servegen
from simulations.traces.trace import Trace


class TraceFormat(str, enum.Enum):
    """Trace file formats ``load_trace`` understands."""

    AZURE = "azure"
    MOONCAKE = "mooncake"
    BURSTGPT = "burstgpt"
    SERVEGEN = "servegen"


# name -> path relative to the traces folder
SHIPPED_TRACES: dict[str, str] = {
    "azure-conv": "azure_llm_2023/AzureLLMInferenceTrace_conv.csv",
    "azure-code": "azure_llm_2023/AzureLLMInferenceTrace_code.csv",
    "mooncake-conv": "mooncake_fast25/conversation_trace.jsonl",
    "mooncake-synthetic": "mooncake_fast25/synthetic_trace.jsonl",
    "servegen-deepseek-r1": "servegen/reason/deepseek-r1",
    "servegen-mm-image": "servegen/multimodal/mm-image",
    "servegen-m-large": "servegen/language/m-large-trace-only",
}

SERVEGEN_DEFAULT_DURATION_S = 3600.0  # a whole m-large folder would be ~240M requests


def traces_dir() -> Path:
    """The folder shipped trace names resolve in."""
    env = os.environ.get("PDSERVE_TRACES_DIR")
    if env:
        return Path(env)
    project_root = Path(__file__).resolve().parents[2]
    return project_root.parent / "shared" / "traces"


def resolve_trace_path(path_or_name: str | Path) -> Path:
    """A shipped trace name's path, or the given path unchanged."""
    key = str(path_or_name)
    if key in SHIPPED_TRACES:
        return traces_dir() / SHIPPED_TRACES[key]
    return Path(path_or_name)


def detect_format(path: Path) -> TraceFormat:
    """Guess the format of ``path`` from its contents."""
    if path.is_dir():
        if any(path.glob("chunk-*-trace.csv")):
            return TraceFormat.SERVEGEN
        raise TraceFormatError(path, "folder holds no chunk-<id>-trace.csv (ServeGen) files")
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "")
    if first.lstrip().startswith("{"):
        return TraceFormat.MOONCAKE
    header = {h.strip() for h in first.split(",")}
    if "ContextTokens" in header:
        return TraceFormat.AZURE
    if "Request tokens" in header:
        return TraceFormat.BURSTGPT
    raise TraceFormatError(path, f"unknown trace format (first line {first.strip()[:80]!r})", line=1)


def load_trace(path_or_name: str | Path, format: TraceFormat | str | None = None, **options: Any) -> Trace:
    """Load a trace by shipped name or path; ``options`` go to the format's loader.

    ServeGen folders are sampled with ``generate_servegen`` (``duration_s``
    defaults to one hour, ``seed`` to 0).
    """
    path = resolve_trace_path(path_or_name)
    if not path.exists():
        known = ", ".join(SHIPPED_TRACES)
        raise FileNotFoundError(f"trace {str(path_or_name)!r} not found at {path} (shipped names: {known})")
    fmt = detect_format(path) if format is None else TraceFormat(format)
    name = options.pop("name", None) or (str(path_or_name) if str(path_or_name) in SHIPPED_TRACES else None)
    if fmt is TraceFormat.AZURE:
        return load_azure_csv(path, name=name, **options)
    if fmt is TraceFormat.MOONCAKE:
        return load_mooncake_jsonl(path, name=name, **options)
    if fmt is TraceFormat.BURSTGPT:
        return load_burstgpt_csv(path, name=name, **options)
    options.setdefault("duration_s", SERVEGEN_DEFAULT_DURATION_S)
    trace = generate_servegen(path, **options)
    return trace if name is None else Trace(name, trace.arrival_s, trace.prompt_tokens, trace.output_tokens)
