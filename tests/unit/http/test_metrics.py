"""ServingMetrics: private registries, every recorder shows up in the exposition with the right value."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from orchestrator.runtime.metrics import RequestOutcome, ServingMetrics


def _values(metrics: ServingMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        assert family.name.startswith("pdserve_")
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_two_instances_do_not_share_state() -> None:
    a, b = ServingMetrics(), ServingMetrics()
    a.record_outcome(RequestOutcome.STOP, "stop")
    assert _values(a)[("pdserve_requests_total", (("outcome", "stop"), ("reason", "stop")))] == 1
    assert ("pdserve_requests_total", (("outcome", "stop"), ("reason", "stop"))) not in _values(b)


def test_latency_recorders() -> None:
    m = ServingMetrics()
    m.record_first_token("interactive", 0.2)
    m.record_finished("interactive", e2e_s=1.2, ttft_s=0.2, output_tokens=11, prompt_tokens=30)
    m.record_finished("interactive", e2e_s=0.3, ttft_s=0.3, output_tokens=1, prompt_tokens=5)  # no TPOT sample
    v = _values(m)
    label = (("slo_class", "interactive"),)
    assert v[("pdserve_time_to_first_token_seconds_count", label)] == 1
    assert v[("pdserve_e2e_request_latency_seconds_count", label)] == 2
    assert v[("pdserve_time_per_output_token_seconds_count", label)] == 1
    assert abs(v[("pdserve_time_per_output_token_seconds_sum", label)] - 0.1) < 1e-12
    assert v[("pdserve_time_per_output_token_seconds_bucket", (("le", "0.1"), ("slo_class", "interactive")))] == 1
    assert v[("pdserve_generation_tokens_total", ())] == 12
    assert v[("pdserve_prompt_tokens_total", ())] == 35


def test_cluster_recorders() -> None:
    m = ServingMetrics()
    m.record_rejection("overloaded")
    m.set_queue_depth("prefill", "p0", 7)
    m.set_running_requests("d0", "decode", 3)
    m.set_kv_blocks("d0", "decode", used_blocks=10, free_blocks=90)
    m.record_kv_transfer("tcp", 4096, 0.002)
    m.record_kv_transfer("tcp", 4096, 0.004)
    m.record_kv_transfer_failure("shm", "checksum")
    m.record_migration("completed")
    m.record_role_flip("prefill", "decode")
    m.set_pool_size("decode", target=3, actual=2)
    m.set_slo_attainment("interactive", 0.95)
    v = _values(m)
    assert v[("pdserve_admission_rejections_total", (("reason", "overloaded"),))] == 1
    assert v[("pdserve_queue_depth", (("instance", "p0"), ("queue", "prefill")))] == 7
    assert v[("pdserve_running_requests", (("instance", "d0"), ("role", "decode")))] == 3
    assert v[("pdserve_kv_blocks_used", (("instance", "d0"), ("role", "decode")))] == 10
    assert v[("pdserve_kv_blocks_free", (("instance", "d0"), ("role", "decode")))] == 90
    assert v[("pdserve_kv_transfer_bytes_total", (("transport", "tcp"),))] == 8192
    assert v[("pdserve_kv_transfer_seconds_count", (("transport", "tcp"),))] == 2
    assert v[("pdserve_kv_transfer_failures_total", (("reason", "checksum"), ("transport", "shm")))] == 1
    assert v[("pdserve_migrations_total", (("outcome", "completed"),))] == 1
    assert v[("pdserve_role_flips_total", (("from_role", "prefill"), ("to_role", "decode")))] == 1
    assert v[("pdserve_pool_size", (("kind", "target"), ("role", "decode")))] == 3
    assert v[("pdserve_pool_size", (("kind", "actual"), ("role", "decode")))] == 2
    assert v[("pdserve_slo_attainment", (("slo_class", "interactive"),))] == 0.95
