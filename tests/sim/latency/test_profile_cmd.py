"""``pdserve profile`` on the real engine with the tiny model."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from simulations.experiments.specs import load_latency
from simulations.latency import BatchShape, load_profile, load_table, read_profile
from simulations.latency.regression import r_squared
from simulations.profile_cmd import ProfileGrid, add_arguments, run
from workers.engine.loader import load_model_config


def test_arguments_parse_and_validate() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--prefill-lengths", "64,16,64", "--decode-batches", "2,1"])
    assert args.prefill_lengths == (16, 64) and args.decode_batches == (1, 2)
    with pytest.raises(SystemExit):
        parser.parse_args(["--decode-contexts", "0,5"])
    with pytest.raises(ValueError, match="statistic"):
        ProfileGrid(statistic="mean")


def test_profile_command_is_registered() -> None:
    from orchestrator.cli import COMMANDS, build_parser

    assert COMMANDS["profile"][0] == "simulations.profile_cmd"
    args = build_parser().parse_args(["profile", "--repeats", "2"])
    assert args.repeats == 2


@pytest.mark.slow
def test_tiny_profile_run_fits_its_own_samples(tmp_path: Path, tiny_model_dir: Path) -> None:
    out = tmp_path / "tiny.json"
    rc = run(
        [
            "-o", str(out), "--model-dir", str(tiny_model_dir), "--no-progress",
            "--prefill-lengths", "16,128,384,768", "--decode-batches", "1,6,16",
            "--decode-contexts", "32,384", "--repeats", "3", "--decode-steps", "8",
        ]
    )  # fmt: skip
    assert rc == 0
    profile = read_profile(out)
    assert profile.metadata["device"] == "cpu" and profile.metadata["dtype"] == "float32"
    # the KV a token carries (K and V, every layer, float32), which the simulator prices transfers with
    kv_bytes = profile.metadata["kv_bytes_per_token"]
    config = load_model_config(tiny_model_dir)
    assert kv_bytes == 2 * config.num_layers * config.num_kv_heads * config.head_dim * 4
    assert load_latency(f"profile:{out}").kv_bytes_per_token == kv_bytes
    assert load_latency(f"profile:{out}", kv_bytes_per_token=0.0).kv_bytes_per_token == 0.0  # the flag wins
    assert len(profile.prefill) == 4 and len(profile.decode) == 6
    model = load_profile(out)
    shapes = [
        BatchShape(prefill_tokens=s.tokens, prefill_tokens_sq=s.tokens_sq, prefill_requests=1)
        for s in profile.prefill
    ]
    shapes += [BatchShape(decode_requests=s.batch, decode_context_tokens=s.context) for s in profile.decode]
    measured = np.array([s.seconds for s in profile.prefill] + [s.seconds for s in profile.decode])
    predicted = np.array([model.step_time_s(shape) for shape in shapes])
    assert r_squared(measured, predicted) > 0.8
    assert profile.fit is not None and profile.fit.prefill_r2 > 0.8
    # a 768-token prompt costs clearly more than a 16-token one
    assert profile.prefill[-1].seconds > 3 * profile.prefill[0].seconds
    table = load_table(out)
    assert table.prefill_time_s(768) == pytest.approx(profile.prefill[-1].seconds)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--repeats", "0"), "repeats and decode_steps must be >= 1"),
        (("--threads", "0"), "--threads must be >= 1"),
        (("-o", "{tmp}/missing/p.json"), "does not exist"),
        (("-o", "{tmp}"), "cannot write a file there"),
        (("--model-dir", "{tmp}/nope"), "no such folder"),
        (("--model-dir", "{tmp}"), "cannot load the model: "),  # a folder without a checkpoint
        (("--device", "bogus"), "expected cpu, cuda or cuda:N"),
    ],
)
def test_bad_options_fail_cleanly_before_measuring(
    extra: tuple[str, ...], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = tuple(arg.replace("{tmp}", str(tmp_path)) for arg in extra)
    argv = ["--no-progress", "-o", str(tmp_path / "p.json"), "--cache-dir", str(tmp_path / "cache"), *extra]
    assert run(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists() and not (tmp_path / "cache").exists()  # nothing was built


def test_cuda_without_cuda_is_a_clean_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert run(["--no-progress", "-o", str(tmp_path / "p.json"), "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
