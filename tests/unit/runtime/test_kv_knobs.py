"""The KV transport knobs from `pdserve up` / `pdserve quickstart` to each worker's endpoint and sender options."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from types import ModuleType

import pytest

from orchestrator.commands import quickstart, up
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
    [({"kv_poll_us": -1.0}, "poll_us must be a finite number"), ({"kv_tcp_congestion": "no such"}, "tcp_congestion must be")],
)
def test_a_bad_knob_fails_when_the_spec_is_built(knobs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WorkerSpec("d0", Role.DECODE, "/models/m", **knobs)  # type: ignore[arg-type]


def _args(command: ModuleType, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("command", [up, quickstart])
def test_bad_kv_flags_are_refused_before_anything_starts(command: ModuleType) -> None:
    assert command._validate(_args(command, "--kv-poll-us", "250", "--kv-tcp-congestion", "system")) is None
    for value in ("-5", "nan", "inf"):
        assert command._validate(_args(command, "--kv-poll-us", value)) == "--kv-poll-us must be a finite number >= 0"
    problem = command._validate(_args(command, "--kv-tcp-congestion", "bbr;reno"))
    assert problem is not None and problem.startswith("--kv-tcp-congestion: tcp_congestion must be")


@pytest.mark.parametrize("command", [up, quickstart])
def test_transport_nixl_is_refused_up_front_where_nixl_is_missing(
    command: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "nixl", None)  # as if not installed
    problem = command._validate(_args(command, "--transport", "nixl"))
    assert problem == "--transport nixl needs NIXL: pip install nixl-cu12 && pip install --no-deps nixl"
    assert command._validate(_args(command, "--transport", "shm")) is None


@pytest.mark.skipif(importlib.util.find_spec("nixl") is None, reason="optional NIXL not installed")
def test_transport_nixl_is_accepted_where_nixl_is_installed() -> None:
    assert up._validate(_args(up, "--transport", "nixl")) is None


def test_quickstart_exits_2_on_bad_flags_without_starting_ray(capsys: pytest.CaptureFixture[str]) -> None:
    assert quickstart.main(_args(quickstart, "--kv-poll-us", "-1")) == 2
    err = capsys.readouterr().err
    assert "pdserve quickstart: --kv-poll-us must be a finite number >= 0" in err
    assert quickstart._validate(_args(quickstart, "--decode", "0")) == "--prefill must be >= 0 and --decode >= 1"


@pytest.mark.parametrize("poll_us", [-1.0, float("nan"), float("inf")])
def test_endpoint_options_refuse_a_poll_that_is_not_a_finite_non_negative_time(poll_us: float) -> None:
    with pytest.raises(ValueError, match="poll_us must be a finite number of microseconds >= 0"):
        EndpointOptions(poll_us=poll_us)
    assert EndpointOptions(poll_us=0.0).poll_us == 0.0
