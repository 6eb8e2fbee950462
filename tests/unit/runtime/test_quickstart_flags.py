"""`pdserve quickstart` refuses bad lengths and SLO targets before it starts anything."""

from __future__ import annotations

import argparse
import sys

import pytest

from orchestrator.commands import quickstart


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    quickstart.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--max-output-tokens", "0"), "--max-output-tokens must be >= 1, got 0"),
        (("--max-prompt-tokens", "-4"), "--max-prompt-tokens must be >= 1, got -4"),
        (("--ttft-slo", "0"), "--ttft-slo must be a positive number of seconds, got 0.0"),
        (("--tpot-slo", "nan"), "--tpot-slo must be a positive number of seconds, got nan"),
        (("--tpot-slo", "-0.1"), "--tpot-slo must be a positive number of seconds, got -0.1"),
    ],
)
def test_bad_lengths_and_slo_targets_exit_2_without_starting_ray(
    argv: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    def ray_is_up() -> bool:
        ray = sys.modules.get("ray")
        return ray is not None and bool(ray.is_initialized())

    up_before = ray_is_up()  # other tests of the session may have started one
    assert quickstart._validate(_args(*argv)) == message
    assert quickstart.main(_args(*argv)) == 2
    assert capsys.readouterr().err.strip() == f"pdserve quickstart: {message}"
    assert ray_is_up() == up_before


def test_the_defaults_are_valid() -> None:
    assert quickstart._validate(_args()) is None
