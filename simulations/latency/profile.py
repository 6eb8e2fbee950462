"""Latency profile files: measured step samples plus fitted coefficients, as JSON.

Format (version 1)::

    {
      "format": "pdserve-latency-profile",
      "version": 1,
      "metadata": {"model": "...", "device": "cpu|cuda|<gpu name>", "dtype": "float32",
                   "created_at": "<ISO 8601 UTC>", "tp_degree": 1, "engine": "pdserve", ...},
      "prefill": [{"tokens": Σ prompt lengths, "tokens_sq": Σ lengths², "seconds": s}, ...],
      "decode":  [{"batch": running requests, "context": Σ their context lengths, "seconds": s}, ...],
      "fit": {"prefill": {"fixed_s": a, "s_per_token": b, "s_per_token_sq": c, "r2": r},
              "decode":  {"fixed_s": a, "s_per_context_token": b, "s_per_request": c, "r2": r}},
      "overheads": {"request_s": s, "handoff_s": s, "prefill_step_s": s, "decode_step_s": s}
    }

``fit`` is optional on read (refitted from the samples when absent); the raw
samples are the source of truth. ``overheads`` (optional; files without it
load with none) are the serving overheads outside the engine's step, measured
against a live endpoint (``overhead.Overheads``; every key optional, 0 when
absent). Metadata values are strings or numbers; unknown keys are kept.
``load_profile(path)`` gives the ``RegressionLatency`` and ``load_table(path)``
the ``TableLatency`` of the same file, both without overheads;
``load_overheads(path)`` gives the overheads to apply with
``overhead.with_step_overheads`` and the cluster's request/hand-off settings.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

from simulations.latency.overhead import Overheads
from simulations.latency.regression import (
    DecodeSample,
    PrefillSample,
    RegressionFit,
    RegressionLatency,
    fit_regression,
)
from simulations.latency.table import TableLatency, table_from_samples
from simulations.latency.tp import TpScaling

PROFILE_FORMAT = "pdserve-latency-profile"
PROFILE_VERSION = 1


class ProfileFormatError(ValueError):
    """A profile file is malformed; the message names the file and field."""

    def __init__(self, path: str | Path, message: str, field: str | None = None):
        self.path = str(path)
        self.field = field
        what = f" field {field!r}:" if field else ""
        super().__init__(f"{self.path}:{what} {message}")


@dataclass(frozen=True)
class LatencyProfile:
    """The contents of one profile file."""

    metadata: dict[str, str | int | float]
    prefill: tuple[PrefillSample, ...]
    decode: tuple[DecodeSample, ...]
    fit: RegressionFit | None = field(default=None)
    overheads: Overheads | None = field(default=None)  # measured against a live endpoint, when known

    def fitted(self) -> RegressionFit:
        """The stored fit, or a fresh one from the samples."""
        return self.fit or fit_regression(self.prefill, self.decode)


def _fit_to_json(fit: RegressionFit) -> dict[str, dict[str, float]]:
    m = fit.model
    return {
        "prefill": {
            "fixed_s": m.prefill_fixed_s,
            "s_per_token": m.prefill_s_per_token,
            "s_per_token_sq": m.prefill_s_per_token_sq,
            "r2": fit.prefill_r2,
        },
        "decode": {
            "fixed_s": m.decode_fixed_s,
            "s_per_context_token": m.decode_s_per_context_token,
            "s_per_request": m.decode_s_per_request,
            "r2": fit.decode_r2,
        },
    }


def profile_to_json(profile: LatencyProfile) -> dict[str, Any]:
    """The JSON document for ``profile`` (fit computed when missing)."""
    return {
        "format": PROFILE_FORMAT,
        "version": PROFILE_VERSION,
        "metadata": dict(profile.metadata),
        "prefill": [
            {"tokens": s.tokens, "tokens_sq": s.tokens_sq, "seconds": s.seconds} for s in profile.prefill
        ],
        "decode": [{"batch": s.batch, "context": s.context, "seconds": s.seconds} for s in profile.decode],
        "fit": _fit_to_json(profile.fitted()),
    } | ({"overheads": asdict(profile.overheads)} if profile.overheads is not None else {})


def write_profile(path: str | Path, profile: LatencyProfile) -> None:
    """Write ``profile`` to ``path`` atomically (temp file, then rename)."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(profile_to_json(profile), indent=1) + "\n", encoding="utf-8")
    tmp.replace(p)


def _number(path: Path, where: str, obj: dict[str, Any], key: str, integer: bool) -> Any:
    if key not in obj:
        raise ProfileFormatError(path, "missing", field=f"{where}.{key}")
    value = obj[key]
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or value < 0:
        kind = "an integer" if integer else "a number"
        raise ProfileFormatError(path, f"expected {kind} >= 0, got {value!r}", field=f"{where}.{key}")
    return value


def _samples(path: Path, doc: dict[str, Any], key: str, fields: tuple[str, ...]) -> list[dict[str, Any]]:
    rows = doc.get(key)
    if not isinstance(rows, list):
        raise ProfileFormatError(path, "expected a list of samples", field=key)
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ProfileFormatError(path, "expected an object", field=f"{key}[{i}]")
        out.append({f: _number(path, f"{key}[{i}]", row, f, integer=f != "seconds") for f in fields})
    return out


def _fit_from_json(path: Path, fit: Any) -> RegressionFit:
    if (
        not isinstance(fit, dict)
        or not isinstance(fit.get("prefill"), dict)
        or not isinstance(fit.get("decode"), dict)
    ):
        raise ProfileFormatError(path, "expected {prefill: {...}, decode: {...}}", field="fit")
    p, d = fit["prefill"], fit["decode"]
    model = RegressionLatency(
        prefill_fixed_s=float(_number(path, "fit.prefill", p, "fixed_s", False)),
        prefill_s_per_token=float(_number(path, "fit.prefill", p, "s_per_token", False)),
        prefill_s_per_token_sq=float(_number(path, "fit.prefill", p, "s_per_token_sq", False)),
        decode_fixed_s=float(_number(path, "fit.decode", d, "fixed_s", False)),
        decode_s_per_context_token=float(_number(path, "fit.decode", d, "s_per_context_token", False)),
        decode_s_per_request=float(_number(path, "fit.decode", d, "s_per_request", False)),
    )
    return RegressionFit(model, float(p.get("r2", float("nan"))), float(d.get("r2", float("nan"))))


def _overheads_from_json(path: Path, doc: Any) -> Overheads:
    if not isinstance(doc, dict):
        raise ProfileFormatError(path, "expected an object of seconds", field="overheads")
    known = {f.name for f in dataclass_fields(Overheads)}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise ProfileFormatError(path, f"unknown keys {unknown}; known: {sorted(known)}", field="overheads")
    values = {key: float(_number(path, "overheads", doc, key, False)) for key in doc}
    try:
        return Overheads(**values)
    except ValueError as exc:
        raise ProfileFormatError(path, str(exc), field="overheads") from None


def read_profile(path: str | Path) -> LatencyProfile:
    """Parse and validate a profile file."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ProfileFormatError(p, f"invalid JSON at line {exc.lineno}: {exc.msg}") from None
    if not isinstance(doc, dict) or doc.get("format") != PROFILE_FORMAT:
        raise ProfileFormatError(p, f"not a {PROFILE_FORMAT} file", field="format")
    if doc.get("version") != PROFILE_VERSION:
        raise ProfileFormatError(
            p, f"unsupported version {doc.get('version')!r} (expected {PROFILE_VERSION})", field="version"
        )
    metadata = doc.get("metadata", {})
    if not isinstance(metadata, dict):
        raise ProfileFormatError(p, "expected an object", field="metadata")
    prefill = tuple(
        PrefillSample(**s) for s in _samples(p, doc, "prefill", ("tokens", "tokens_sq", "seconds"))
    )
    decode = tuple(DecodeSample(**s) for s in _samples(p, doc, "decode", ("batch", "context", "seconds")))
    fit = _fit_from_json(p, doc["fit"]) if "fit" in doc else None
    if fit is None and (not prefill or not decode):
        raise ProfileFormatError(
            p, "needs prefill and decode samples, or a fit", field="prefill" if not prefill else "decode"
        )
    overheads = _overheads_from_json(p, doc["overheads"]) if "overheads" in doc else None
    return LatencyProfile(metadata=metadata, prefill=prefill, decode=decode, fit=fit, overheads=overheads)


def load_profile(path: str | Path, tp: TpScaling | None = None) -> RegressionLatency:
    """The regression model stored in (or fitted from) a profile file."""
    model = read_profile(path).fitted().model
    return model if tp is None else RegressionLatency(*_coefficients(model), tp=tp)


def load_overheads(path: str | Path) -> Overheads:
    """The serving overheads stored in a profile file (all zero when it has none)."""
    return read_profile(path).overheads or Overheads()


def _coefficients(m: RegressionLatency) -> tuple[float, float, float, float, float, float]:
    return (
        m.prefill_fixed_s,
        m.prefill_s_per_token,
        m.prefill_s_per_token_sq,
        m.decode_fixed_s,
        m.decode_s_per_context_token,
        m.decode_s_per_request,
    )


def load_table(path: str | Path, tp: TpScaling | None = None) -> TableLatency:
    """The interpolation-table model built from a profile file's samples."""
    profile = read_profile(path)
    try:
        return table_from_samples(profile.prefill, profile.decode, tp or TpScaling())
    except ValueError as exc:
        raise ProfileFormatError(path, str(exc)) from None
