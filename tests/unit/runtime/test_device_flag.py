"""--device of `pdserve up` and `pdserve quickstart`: GPU shares, and a refusal before anything starts."""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

import pytest
import torch

from orchestrator.commands import quickstart, up
from orchestrator.runtime.embedded import gpu_share, start_embedded


def _ray_is_up() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and bool(ray.is_initialized())


def _args(command: ModuleType, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(
    ("gpus", "workers", "share"),
    [(1, 1, 1.0), (4, 2, 1.0), (2, 2, 1.0), (1, 2, 0.5), (1, 3, 1 / 3), (2, 3, 0.5), (3, 7, 1 / 3), (8, 9, 0.5)],
)
def test_gpu_share(gpus: int, workers: int, share: float) -> None:
    assert gpu_share(gpus, workers) == pytest.approx(share)


def test_every_worker_fits_and_no_share_straddles_two_gpus() -> None:
    for gpus in range(1, 9):
        for workers in range(1, 40):
            share = gpu_share(gpus, workers)
            per_gpu = round(1 / share)
            assert per_gpu * share == pytest.approx(1.0)  # whole shares per GPU
            assert per_gpu * gpus >= workers
            assert (per_gpu - 1) * gpus < workers  # the largest share that fits


@pytest.mark.parametrize(("gpus", "workers"), [(0, 2), (2, 0)])
def test_gpu_share_needs_a_gpu_and_a_worker(gpus: int, workers: int) -> None:
    with pytest.raises(ValueError, match="at least one GPU and one worker"):
        gpu_share(gpus, workers)


def test_cpu_is_the_default() -> None:
    for cmd in (up, quickstart):
        assert _args(cmd).device == "cpu"
        assert cmd._validate(_args(cmd)) is None


@pytest.mark.parametrize("command", [up, quickstart])
def test_device_cuda_is_checked_here_before_anything_starts(
    command: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _args(command, "--device", "cuda")
    problem = command._validate(args)
    if torch.cuda.is_available():
        assert problem is None
        return
    assert problem == f"--device cuda: torch {torch.__version__} ({'CUDA ' + torch.version.cuda if torch.version.cuda else 'a CPU-only build'}) sees no CUDA device on this machine"
    up_before = _ray_is_up()
    assert command.main(args) == 2
    assert capsys.readouterr().err.strip() == f"pdserve {command.__name__.rsplit('.', 1)[-1]}: {problem}"
    assert _ray_is_up() == up_before


def test_a_cluster_checks_its_own_gpus() -> None:
    # the machine running `pdserve up --address` may have no GPU; the cluster's workers do
    assert up._validate(_args(up, "--device", "cuda", "--address", "ray://head:10001")) is None


def test_an_unknown_device_is_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _args(up, "--device", "gpu")
    assert "invalid choice: 'gpu'" in capsys.readouterr().err


def test_start_embedded_refuses_a_bad_device_before_ray_starts() -> None:
    up_before = _ray_is_up()
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'.*'cuda:1'"):
        start_embedded(device="cuda:1")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="device cuda: torch .* sees no CUDA device"):
            start_embedded(device="cuda")
    assert _ray_is_up() == up_before
