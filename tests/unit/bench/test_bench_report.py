"""Bench summaries on crafted results: percentiles, TPOT, attainment, error counts, JSON."""

from __future__ import annotations

import json

import pytest

from orchestrator.runtime.bench.report import (
    distribution,
    format_report,
    report_json,
    slo_attainment,
    summarize,
)
from orchestrator.runtime.bench.runner import Outcome, RequestResult


def ok(index: int, ttft_s: float, e2e_s: float, tokens: int, sent_s: float = 0.0) -> RequestResult:
    return RequestResult(index, sent_s, sent_s, Outcome.OK, 200, 10, tokens, tokens, ttft_s, e2e_s)


def failed(index: int, outcome: Outcome, status: int | None) -> RequestResult:
    return RequestResult(index, 0.0, 0.0, outcome, status, 10, 5, error="boom")


def test_distribution_matches_linear_interpolation() -> None:
    dist = distribution([float(v) for v in range(1, 101)])  # 1..100
    assert dist is not None
    assert dist.count == 100 and dist.mean_s == 50.5
    assert dist.p50_s == pytest.approx(50.5)
    assert dist.p90_s == pytest.approx(90.1)
    assert dist.p99_s == pytest.approx(99.01)
    assert distribution([]) is None


def test_summary_on_crafted_results() -> None:
    results = [
        ok(0, ttft_s=0.1, e2e_s=1.1, tokens=11),  # tpot 0.1
        ok(1, ttft_s=0.3, e2e_s=0.7, tokens=5),  # tpot 0.1
        ok(2, ttft_s=0.2, e2e_s=0.2, tokens=1, sent_s=2.0),  # no tpot; ends at 2.2 s
        failed(3, Outcome.HTTP_ERROR, 429),
        failed(4, Outcome.HTTP_ERROR, 429),
        failed(5, Outcome.TIMEOUT, None),
    ]
    report = summarize(results, ttft_slo_s=0.25, tpot_slo_s=0.15)
    assert report.num_requests == 6 and report.num_ok == 3
    assert report.errors == {"429": 2, "timeout": 1}
    assert report.duration_s == pytest.approx(2.2)
    assert report.request_throughput_per_s == pytest.approx(3 / 2.2)
    assert report.output_tokens_per_s == pytest.approx(17 / 2.2)
    assert report.ttft is not None and report.ttft.p50_s == pytest.approx(0.2)
    assert report.tpot is not None and report.tpot.count == 2 and report.tpot.mean_s == pytest.approx(0.1)
    assert report.e2e is not None and report.e2e.p90_s == pytest.approx(0.7 + 0.8 * 0.4)
    # requests 0 and 2 meet both targets; request 1 misses TTFT; failures count as misses
    assert report.slo_attainment == pytest.approx(2 / 6)
    text = format_report(report)
    assert "429: 2" in text and "timeout: 1" in text and "33.3%" in text


def test_attainment_with_one_target_and_without_any() -> None:
    results = [ok(0, 0.1, 2.1, 3), ok(1, 0.5, 0.6, 2)]  # tpot 1.0 and 0.1
    assert slo_attainment(results, ttft_slo_s=0.2, tpot_slo_s=None) == 0.5
    assert slo_attainment(results, ttft_slo_s=None, tpot_slo_s=0.5) == 0.5
    assert slo_attainment(results, None, None) is None
    assert slo_attainment([], 1.0, 1.0) is None


def test_all_failed_run() -> None:
    report = summarize([failed(0, Outcome.CONNECTION_ERROR, None)], ttft_slo_s=1.0)
    assert report.num_ok == 0 and report.ttft is None and report.slo_attainment == 0.0
    assert report.request_throughput_per_s == 0.0
    assert "connection_error: 1" in format_report(report)


def test_json_document_has_one_row_per_request() -> None:
    results = [ok(0, 0.1, 0.5, 5), failed(1, Outcome.STREAM_ERROR, 200)]
    doc = json.loads(json.dumps(report_json(summarize(results), results, {"trace": "t"})))
    assert doc["config"] == {"trace": "t"}
    assert [r["outcome"] for r in doc["requests"]] == ["ok", "stream_error"]
    assert doc["requests"][0]["tpot_s"] == pytest.approx(0.1)
    assert doc["requests"][1]["tpot_s"] is None
    assert doc["summary"]["errors"] == {"stream_error": 1}
