"""The transfer descriptor: plain fields, sizes, JSON round trip, clear errors."""

from __future__ import annotations

import pytest

from workers.kv.descriptor import InvalidDescriptor, TransferDescriptor, TransferStats, TransportKind


def _desc(**overrides: object) -> TransferDescriptor:
    fields: dict[str, object] = dict(
        request_id="req-1", kind=TransportKind.TCP, address="127.0.0.1:5555", num_tokens=300,
        num_layers=4, num_kv_heads=2, head_dim=64, dtype="bfloat16",
    )
    fields.update(overrides)
    return TransferDescriptor(**fields)  # type: ignore[arg-type]


def test_sizes_follow_shape_and_dtype() -> None:
    d = _desc()
    assert d.tensor_nbytes == 300 * 2 * 64 * 2
    assert d.layer_nbytes == 2 * d.tensor_nbytes
    assert d.total_nbytes == 4 * d.layer_nbytes


@pytest.mark.parametrize("kind", list(TransportKind))
def test_json_round_trip_keeps_every_field(kind: TransportKind) -> None:
    d = _desc(kind=kind, device="cuda", request_id="ünï-çødé", host_id="4d89cc8f-8fdc-43bc-887f-e8eceea8aa3d")
    text = d.to_json()
    assert "torch." not in text  # plain fields only
    assert TransferDescriptor.from_json(text) == d
    assert TransferDescriptor.from_dict(d.to_dict()) == d


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kind": "carrier-pigeon"}, "unknown transport kind"),
        ({"num_tokens": 0}, "num_tokens must be >= 1"),
        ({"num_layers": "4"}, "'num_layers' must be int"),
        ({"dtype": "complex64"}, "dtype 'complex64' not supported"),
        ({"device": "tpu"}, "device must be"),
        ({"host_id": 7}, "'host_id' must be str"),
        ({"extra_field": 1}, "unknown fields"),
    ],
)
def test_bad_fields_are_named(change: dict[str, object], message: str) -> None:
    fields = {**_desc().to_dict(), **change}
    with pytest.raises(InvalidDescriptor, match=message):
        TransferDescriptor.from_dict(fields)


def test_missing_field_and_bad_json() -> None:
    fields = _desc().to_dict()
    del fields["address"]
    with pytest.raises(InvalidDescriptor, match="missing field 'address'"):
        TransferDescriptor.from_dict(fields)
    with pytest.raises(InvalidDescriptor, match="not valid JSON"):
        TransferDescriptor.from_json("{not json")


def test_optional_fields_may_be_missing() -> None:
    """A descriptor from a peer that sends neither device nor host_id gets their defaults."""
    fields = _desc(device="cpu", host_id="").to_dict()
    del fields["device"], fields["host_id"]
    assert TransferDescriptor.from_dict(fields) == _desc(device="cpu", host_id="")


def test_stats_rates() -> None:
    s = TransferStats("r", TransportKind.SHM, num_bytes=2_000_000_000, num_layers=32, seconds=0.5, wire_s=0.25)
    assert s.gbps == pytest.approx(4.0)
    assert s.wire_gbps == pytest.approx(8.0)
    assert s.ms == pytest.approx(500.0)
