"""ServeGen (Alibaba Bailian) client data, turned into a sampled request trace.

A ServeGen folder holds, per anonymized client ``<id>``:

- ``chunk-<id>-trace.csv`` (no header): ``window_start_s, rate_req_per_s,
  cv, pattern, param1, param2`` per 600-s window; ``pattern`` is ``Gamma``,
  ``Weibull`` or empty (idle window).
- optionally ``chunk-<id>-dataset.json``: ``{window_start_s: {field:
  "<python dict literal {value: probability}>"}}`` every 6 h; fields are
  ``input_tokens``/``output_tokens`` (language, reason) or ``text_tokens``,
  ``image_tokens``, ``audio_tokens``, ``video_tokens``, ``output_tokens``
  (multimodal; a prompt is the sum of the four token kinds, drawn
  independently).

``generate_servegen`` samples, for every client and window, a renewal
process over the window: the inter-arrival shape comes from the fitted
pattern (``param1`` is the shape for both Gamma and Weibull) and the scale is
re-derived so that the mean rate equals the window's ``rate`` exactly (the
published scales sometimes disagree with the rate). Each request takes its
lengths from the client's PDFs of the latest dataset step at or before its
arrival (the nearest non-empty step when that one is empty), or from
``fallback`` when the client has no dataset file (``m-large-trace-only``).
"""

from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from simulations.traces.errors import TraceFormatError
from simulations.traces.synthetic import LengthSampler
from simulations.traces.trace import Trace

WINDOW_S = 600.0  # every published trace.csv uses 10-minute windows
_CHUNK_RE = re.compile(r"chunk-(\d+)-trace\.csv$")
PROMPT_FIELDS = ("input_tokens", "text_tokens", "image_tokens", "audio_tokens", "video_tokens")

Pdf = tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]  # values, probabilities summing to 1


@dataclass(frozen=True)
class ServeGenWindow:
    """One client's arrival pattern over one window."""

    start_s: float
    rate_per_s: float
    cv: float
    pattern: str  # "Gamma", "Weibull" or "" when idle
    shape: float


@dataclass(frozen=True)
class ServeGenClient:
    """A client's windows and (when published) its length PDFs keyed by dataset step start."""

    client_id: int
    windows: tuple[ServeGenWindow, ...]
    length_pdfs: dict[float, dict[str, Pdf]] = field(default_factory=dict)


def _parse_trace_csv(path: Path) -> tuple[ServeGenWindow, ...]:
    windows = []
    with open(path, encoding="utf-8") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            parts = raw.rstrip("\n").split(",")
            if len(parts) != 6:
                raise TraceFormatError(path, f"expected 6 fields, found {len(parts)}", line=line_no)
            names = ("window_start_s", "rate", "cv", "pattern", "param1", "param2")
            values = []
            for k in (0, 1, 2, 4):
                try:
                    values.append(float(parts[k]) if parts[k] else 0.0)
                except ValueError:
                    raise TraceFormatError(
                        path, f"not a number: {parts[k]!r}", line=line_no, field=names[k]
                    ) from None
            start_s, rate, cv, shape = values
            pattern = parts[3].strip()
            if pattern not in ("", "Gamma", "Weibull"):
                raise TraceFormatError(path, f"unknown pattern {pattern!r}", line=line_no, field="pattern")
            if rate < 0 or cv < 0:
                raise TraceFormatError(
                    path, "rate and cv must be >= 0", line=line_no, field="rate" if rate < 0 else "cv"
                )
            windows.append(ServeGenWindow(start_s, rate, cv, pattern, shape))
    return tuple(windows)


def _parse_pdf_slow(path: Path, step: str, name: str, body: str) -> Pdf | None:
    try:
        raw = ast.literal_eval(body)
    except (ValueError, SyntaxError):
        raise TraceFormatError(path, f"step {step}: not a dict literal", field=name) from None
    if not isinstance(raw, dict):
        raise TraceFormatError(path, f"step {step}: expected a dict", field=name)
    if not raw:
        return None
    try:
        values = np.array([int(v) for v in raw.keys()], dtype=np.int64)
        probs = np.array([float(p) for p in raw.values()], dtype=np.float64)
    except (TypeError, ValueError):
        raise TraceFormatError(path, f"step {step}: expected {{int: probability}}", field=name) from None
    return values, probs


def _parse_pdf(path: Path, step: str, name: str, text: str) -> Pdf | None:
    body = text.strip()
    parsed: Pdf | None = None
    if body.startswith("{") and body.endswith("}") and body[1:-1].strip():
        # Fast path for the published shape "{int: float, ...}"; literal_eval is ~10x slower.
        try:
            flat = np.array(body[1:-1].replace(":", ",").split(","), dtype=np.float64)
            if len(flat) % 2 == 0 and np.all(flat[0::2] == np.round(flat[0::2])):
                parsed = flat[0::2].astype(np.int64), flat[1::2]
        except ValueError:
            parsed = None
    if parsed is None:
        parsed = _parse_pdf_slow(path, step, name, body)
        if parsed is None:
            return None
    values, probs = parsed
    if np.any(probs < 0) or not probs.sum() > 0:
        raise TraceFormatError(path, f"step {step}: probabilities must be >= 0 and not all 0", field=name)
    return values, probs / probs.sum()


def _parse_dataset_json(path: Path) -> dict[float, dict[str, Pdf]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TraceFormatError(path, f"invalid JSON: {exc.msg}", line=exc.lineno) from None
    out: dict[float, dict[str, Pdf]] = {}
    for step, fields in data.items():
        pdfs = {}
        for name, text in fields.items():
            if name in (*PROMPT_FIELDS, "output_tokens"):
                pdf = _parse_pdf(path, step, name, text)
                if pdf is not None:
                    pdfs[name] = pdf
        if "output_tokens" in pdfs and any(f in pdfs for f in PROMPT_FIELDS):
            out[float(step)] = pdfs
    return out


def load_servegen_clients(
    folder: str | Path, client_ids: tuple[int, ...] | None = None
) -> list[ServeGenClient]:
    """Read the ``chunk-<id>-trace.csv`` files (and dataset JSONs when present) in ``folder``, all or ``client_ids``."""
    root = Path(folder)
    found: dict[int, Path] = {}
    for path in root.glob("chunk-*-trace.csv"):
        match = _CHUNK_RE.search(path.name)
        if match is not None:
            found[int(match.group(1))] = path
    if not found:
        raise TraceFormatError(root, "no chunk-<id>-trace.csv files in folder")
    wanted = sorted(found) if client_ids is None else sorted(set(client_ids))
    unknown = [c for c in wanted if c not in found]
    if unknown:
        raise ValueError(f"{root}: no trace file for client id(s) {unknown}")
    clients = []
    for cid in wanted:
        dataset = root / f"chunk-{cid}-dataset.json"
        pdfs = _parse_dataset_json(dataset) if dataset.exists() else {}
        clients.append(ServeGenClient(cid, _parse_trace_csv(found[cid]), pdfs))
    return clients


def _window_gaps_s(w: ServeGenWindow, n: int, rng: np.random.Generator) -> npt.NDArray[np.float64]:
    mean_s = 1.0 / w.rate_per_s
    if w.pattern == "Weibull" and w.shape > 0:
        return rng.weibull(w.shape, size=n) * (mean_s / math.gamma(1.0 + 1.0 / w.shape))
    shape = w.shape if w.pattern == "Gamma" and w.shape > 0 else (1.0 / w.cv**2 if w.cv > 0 else 1.0)
    return rng.gamma(shape, mean_s / shape, size=n)


def _window_arrivals_s(w: ServeGenWindow, end_s: float, rng: np.random.Generator) -> npt.NDArray[np.float64]:
    """Renewal arrivals in ``[w.start_s, end_s)``; the first gap is scaled by U(0,1) to start mid-process."""
    span_s = end_s - w.start_s
    if w.rate_per_s <= 0 or span_s <= 0:
        return np.zeros(0)
    chunks, t = [], 0.0
    batch = int(w.rate_per_s * span_s * 1.2) + 16
    first = True
    while t < span_s:
        gaps = _window_gaps_s(w, batch, rng)
        if first:
            gaps[0] *= rng.random()
            first = False
        times = t + np.cumsum(gaps)
        chunks.append(times[times < span_s])
        t = float(times[-1])
    return w.start_s + np.concatenate(chunks)


def _sample_pdf(pdf: Pdf, n: int, rng: np.random.Generator) -> npt.NDArray[np.int64]:
    values, probs = pdf
    return values[rng.choice(len(values), size=n, p=probs)]


def _client_lengths(
    client: ServeGenClient,
    arrival_s: npt.NDArray[np.float64],
    fallback: LengthSampler,
    rng: np.random.Generator,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    n = len(arrival_s)
    if not client.length_pdfs:
        return fallback.sample(n, rng)
    steps = np.array(sorted(client.length_pdfs))
    which = np.clip(np.searchsorted(steps, arrival_s, side="right") - 1, 0, len(steps) - 1)
    prompt = np.zeros(n, np.int64)
    output = np.zeros(n, np.int64)
    for k, step in enumerate(steps):
        rows = np.flatnonzero(which == k)
        if len(rows) == 0:
            continue
        pdfs = client.length_pdfs[float(step)]
        for name in PROMPT_FIELDS:
            if name in pdfs:
                prompt[rows] += _sample_pdf(pdfs[name], len(rows), rng)
        output[rows] = _sample_pdf(pdfs["output_tokens"], len(rows), rng)
    return prompt, output


def generate_servegen(
    folder: str | Path,
    start_s: float = 0.0,
    duration_s: float | None = None,
    seed: int = 0,
    rate_scale: float = 1.0,
    client_ids: tuple[int, ...] | None = None,
    fallback: LengthSampler | None = None,
) -> Trace:
    """Sample a multi-client trace from a ServeGen folder over ``[start_s, start_s + duration_s)``.

    ``rate_scale`` multiplies every window's rate; ``client_ids`` restricts
    the clients; ``fallback`` supplies lengths for clients without PDFs
    (default: fixed 1024 prompt / 128 output tokens). Arrivals are re-based
    to ``start_s``. Same arguments and seed give the same trace.
    """
    if rate_scale <= 0:
        raise ValueError(f"rate_scale must be > 0, got {rate_scale}")
    clients = load_servegen_clients(folder, client_ids)
    fallback = fallback or LengthSampler()
    end_s = math.inf if duration_s is None else start_s + duration_s
    rng = np.random.default_rng(seed)
    arrivals, prompts, outputs = [], [], []
    for client in clients:
        times = []
        for w in client.windows:
            lo, hi = max(w.start_s, start_s), min(w.start_s + WINDOW_S, end_s)
            if hi <= lo or w.rate_per_s <= 0:
                continue
            scaled = ServeGenWindow(lo, w.rate_per_s * rate_scale, w.cv, w.pattern, w.shape)
            times.append(_window_arrivals_s(scaled, hi, rng))
        t = np.concatenate(times) if times else np.zeros(0)
        p, o = _client_lengths(client, t, fallback, rng)
        arrivals.append(t)
        prompts.append(p)
        outputs.append(o)
    arrival_s = np.concatenate(arrivals) if arrivals else np.zeros(0)
    order = np.argsort(arrival_s, kind="stable")
    return Trace(
        name=f"servegen-{Path(folder).name}",
        arrival_s=arrival_s[order] - start_s,
        prompt_tokens=(np.concatenate(prompts) if prompts else np.zeros(0, np.int64))[order],
        output_tokens=(np.concatenate(outputs) if outputs else np.zeros(0, np.int64))[order],
    )
