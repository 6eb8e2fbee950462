"""The KV transport knobs from `pdserve up` / `pdserve quickstart` to each worker's endpoint and sender options."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from types import ModuleType

import pytest

from orchestrator.commands import quickstart, up
from orchestrator.core.types import Role
from workers.kv.congestion import ALLOWED, refusal
from workers.kv.interface import EndpointOptions, SenderOptions
from workers.service.host import WorkerSpec, kv_options


def test_worker_spec_knobs_reach_the_transport_options() -> None:
    spec = WorkerSpec("d0", Role.DECODE, "/models/m", host="10.1.2.3", kv_poll_us=0.0, kv_tcp_congestion="cubic")
    endpoint, sender = kv_options(spec)
    assert (endpoint.host, endpoint.poll_us, sender.tcp_congestion) == ("10.1.2.3", 0.0, "cubic")
    endpoint, sender = kv_options(WorkerSpec("p0", Role.PREFILL, "/models/m"))
    assert endpoint.poll_us == EndpointOptions().poll_us and sender == SenderOptions()  # None keeps each default


@pytest.mark.parametrize(
    ("transport", "device", "staging"),
    [("torch_dist", "cuda", "cuda"), ("torch_dist", "cuda:1", "cuda:1"), ("torch_dist", "cpu", "cpu"),
     ("tcp", "cuda", "cpu"), ("shm", "cuda", "cpu")],
)
def test_a_cuda_worker_stages_torch_dist_kv_on_its_gpu(transport: str, device: str, staging: str) -> None:
    # on the GPU, a torch_dist pair between two GPUs moves KV with NCCL; the socket transports stage in host memory
    endpoint, sender = kv_options(WorkerSpec("d0", Role.DECODE, "/models/m", transport=transport, device=device))
    assert endpoint.device == staging
    assert sender.device == device  # the GPU a sender offers its pairs is the worker's own, index included


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


@pytest.mark.skipif(not ALLOWED.is_file(), reason="needs Linux's tcp_allowed_congestion_control")
@pytest.mark.parametrize("command", [up, quickstart])
def test_a_congestion_algorithm_this_host_does_not_allow_is_refused_before_anything_starts(
    command: ModuleType,
) -> None:
    allowed = ALLOWED.read_text().split()
    problem = command._validate(_args(command, "--kv-tcp-congestion", "bogus"))
    assert problem is not None and "'bogus' is not allowed on this host" in problem
    assert all(name in problem for name in allowed)
    for fine in ("auto", "system", allowed[0]):
        assert command._validate(_args(command, "--kv-tcp-congestion", fine)) is None


def test_congestion_problem_lists_what_may_be_used() -> None:
    allowed, available = ("reno", "bbr"), ("reno", "bbr", "cubic")
    assert refusal("bbr", allowed, available, privileged=False) is None
    problem = refusal("cubic", allowed, available, privileged=False)
    assert problem is not None and problem.endswith("one of: bbr, reno (net.ipv4.tcp_allowed_congestion_control)")
    assert refusal("cubic", allowed, available, privileged=True) is None  # CAP_NET_ADMIN may
    assert refusal("vegas", allowed, available, privileged=True) is not None
    assert refusal("anything", None, None, privileged=False) is None  # no /proc: cannot tell


def test_quickstart_refuses_a_bogus_congestion_algorithm_without_starting_ray(
    capsys: pytest.CaptureFixture[str],
) -> None:
    if not ALLOWED.is_file():
        pytest.skip("needs Linux's tcp_allowed_congestion_control")
    assert quickstart.main(_args(quickstart, "--kv-tcp-congestion", "bogus")) == 2
    assert "pdserve quickstart: --kv-tcp-congestion 'bogus' is not allowed" in capsys.readouterr().err


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


def test_up_refuses_a_port_in_use_before_anything_starts(capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert up.port_problem("127.0.0.1", port) == f"cannot listen on 127.0.0.1:{port}: Address already in use"
        assert up.main(_args(up, "--port", str(port))) == 2
        assert capsys.readouterr().err.strip() == f"pdserve up: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert up.port_problem("127.0.0.1", port) is None  # free again
    assert up.port_problem("127.0.0.1", 0) is None
