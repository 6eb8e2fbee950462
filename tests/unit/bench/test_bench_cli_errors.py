"""`pdserve bench` refuses bad targets and unreachable endpoints up front, with a message, not a traceback."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.runtime.bench.report import slo_attainment, slo_target

HEAD40 = Path(__file__).resolve().parents[2] / "data" / "traces" / "azure_conv_head40.csv"


@pytest.fixture()
def closed_url() -> str:
    """A local URL nothing listens on (the port was free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _bench(url: str, tmp_path: Path, *extra: str) -> int:
    return main(["bench", "--trace", str(HEAD40), "--url", url, "--no-progress", "--out", str(tmp_path / "b"),
                 *extra])


@pytest.mark.parametrize(("flag", "value"), [("--ttft-slo", "0"), ("--tpot-slo", "-0.1"), ("--tpot-slo", "nan")])
def test_bad_slo_is_refused_before_anything_is_sent(flag: str, value: str, closed_url: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    # The URL is unreachable: only a check made before contacting it can give this message.
    assert _bench(closed_url, tmp_path, flag, value) == 2
    assert f"{flag} must be a positive number of seconds" in capsys.readouterr().err


@pytest.mark.parametrize("url", ["closed", "not-a-url", "ftp://127.0.0.1"])
def test_unreachable_endpoint_is_a_clean_error(url: str, closed_url: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    url = closed_url if url == "closed" else url
    assert _bench(url, tmp_path) == 2
    assert f"cannot reach {url}" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_slo_target_treats_a_missing_target_as_never_missed() -> None:
    assert slo_target(None, None) is None
    target = slo_target(0.5, None)
    assert target is not None and target.ttft_s == 0.5 and math.isinf(target.tpot_s)
    assert slo_attainment([], 0.5, None) is None
