"""Profile files: round trip, validation errors, and the table/regression models built from them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simulations.latency import (
    BatchShape,
    DecodeSample,
    LatencyProfile,
    PrefillSample,
    ProfileFormatError,
    fit_regression,
    load_profile,
    load_table,
    read_profile,
    write_profile,
)

PREFILL = tuple(PrefillSample(n, n * n, 0.002 + 1e-5 * n + 1e-9 * n * n) for n in (32, 128, 512, 2048))
DECODE = tuple(
    DecodeSample(b, b * c, 0.005 + 1e-4 * b + 2e-8 * b * c) for b in (1, 4, 16) for c in (128, 1024)
)
META: dict[str, str | int | float] = {
    "model": "test",
    "device": "cpu",
    "dtype": "float32",
    "created_at": "2026-01-01T00:00:00+00:00",
    "tp_degree": 1,
}


def _write(tmp_path: Path) -> Path:
    path = tmp_path / "profile.json"
    write_profile(path, LatencyProfile(META, PREFILL, DECODE))
    return path


def test_round_trip(tmp_path: Path) -> None:
    path = _write(tmp_path)
    doc = json.loads(path.read_text())
    assert doc["format"] == "pdserve-latency-profile" and doc["version"] == 1
    assert doc["fit"]["prefill"]["r2"] == pytest.approx(1.0)
    profile = read_profile(path)
    assert profile.prefill == PREFILL and profile.decode == DECODE
    assert profile.metadata == META
    model = load_profile(path)
    assert model == fit_regression(PREFILL, DECODE).model
    shape = BatchShape(prefill_tokens=300, prefill_tokens_sq=90_000, prefill_requests=1)
    assert model.step_time_s(shape) == pytest.approx(0.002 + 3e-3 + 9e-5)
    table = load_table(path)
    for s in DECODE:
        assert table.step_time_s(
            BatchShape(decode_requests=s.batch, decode_context_tokens=s.context)
        ) == pytest.approx(s.seconds)
    assert not path.with_name("profile.json.tmp").exists()


def test_fit_is_recomputed_when_absent(tmp_path: Path) -> None:
    path = _write(tmp_path)
    doc = json.loads(path.read_text())
    del doc["fit"]
    path.write_text(json.dumps(doc))
    assert load_profile(path).prefill_s_per_token == pytest.approx(1e-5, rel=1e-6)


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda d: d.update(format="other"), "format"),
        (lambda d: d.update(version=99), "version"),
        (lambda d: d["prefill"][1].pop("tokens_sq"), "prefill[1].tokens_sq"),
        (lambda d: d["decode"][2].update(seconds="fast"), "decode[2].seconds"),
        (lambda d: d["decode"][0].update(batch=-1), "decode[0].batch"),
        (lambda d: d["fit"]["decode"].pop("s_per_request"), "fit.decode.s_per_request"),
    ],
)
def test_malformed_profile_names_field(tmp_path: Path, edit: object, field: str) -> None:
    path = _write(tmp_path)
    doc = json.loads(path.read_text())
    edit(doc)  # type: ignore[operator]
    path.write_text(json.dumps(doc))
    with pytest.raises(ProfileFormatError) as info:
        load_profile(path)
    assert info.value.field == field and str(path) in str(info.value)


def test_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ProfileFormatError, match="invalid JSON"):
        read_profile(path)
