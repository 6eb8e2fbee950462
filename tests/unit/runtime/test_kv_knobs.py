"""The KV transport knobs from `pdserve up` to each worker's endpoint and sender options."""

from __future__ import annotations

import argparse

import pytest

from orchestrator.commands import up
from orchestrator.core.types import Role
from workers.kv.interface import EndpointOptions, SenderOptions
from workers.service.host import WorkerSpec, kv_options


def test_worker_spec_knobs_reach_the_transport_options() -> None:
    spec = WorkerSpec("d0", Role.DECODE, "/models/m", host="10.1.2.3", kv_poll_us=0.0, kv_tcp_congestion="cubic")
    endpoint, sender = kv_options(spec)
    assert (endpoint.host, endpoint.poll_us, sender.tcp_congestion) == ("10.1.2.3", 0.0, "cubic")
    endpoint, sender = kv_options(WorkerSpec("p0", Role.PREFILL, "/models/m"))
    assert endpoint.poll_us == EndpointOptions().poll_us and sender == SenderOptions()  # None keeps each default


@pytest.mark.parametrize(
    ("knobs", "message"),
    [({"kv_poll_us": -1.0}, "kv_poll_us must be >= 0"), ({"kv_tcp_congestion": "no such"}, "tcp_congestion must be")],
)
def test_a_bad_knob_fails_when_the_spec_is_built(knobs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WorkerSpec("d0", Role.DECODE, "/models/m", **knobs)  # type: ignore[arg-type]


def _up_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    up.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_up_rejects_bad_kv_knobs_before_starting_anything() -> None:
    assert up._validate(_up_args("--kv-poll-us", "250", "--kv-tcp-congestion", "system")) is None
    assert up._validate(_up_args("--kv-poll-us", "-5")) == "--kv-poll-us must be >= 0"
    problem = up._validate(_up_args("--kv-tcp-congestion", "bbr;reno"))
    assert problem is not None and problem.startswith("--kv-tcp-congestion: tcp_congestion must be")
