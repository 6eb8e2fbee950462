"""Prometheus metrics of pdserve, all prefixed ``pdserve_``.

One ``ServingMetrics`` owns its own ``CollectorRegistry`` (never the process
global one), so tests and several routers in one process do not collide. Who
records what:

- the HTTP front end: TTFT/TPOT/e2e histograms and request outcomes;
- admission: rejections by reason;
- routers, workers and the controller: queue depths, running requests, KV
  blocks used/free, KV transfers, migrations, role flips and planner sizes.

Every ``record``/``set`` method is cheap and thread-safe (prometheus_client
locks per child); ``render`` returns the text exposition format for
``GET /metrics``.
"""

from __future__ import annotations

from enum import Enum

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

PREFIX = "pdserve_"

# Seconds. From a few ms (GPU decode steps) to minutes (CPU prefill of long
# prompts under load), roughly x2 per bucket.
TTFT_BUCKETS_S = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 51.2, 102.4, 300.0,
)
TPOT_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5,
)
E2E_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
TRANSFER_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class RequestOutcome(str, Enum):
    """How a request ended, as counted in ``pdserve_requests_total{outcome=...}``."""

    STOP = "stop"  # finished: EOS, stop token or stop string
    LENGTH = "length"  # finished: max_tokens reached
    ABORT = "abort"  # the client went away or the request was cancelled
    REJECTED = "rejected"  # admission said no (HTTP 429)
    INVALID = "invalid"  # bad input (HTTP 4xx other than 429)
    ERROR = "error"  # failed on the server side (HTTP 5xx, deadline)


class ServingMetrics:
    """All pdserve metrics in one private registry; construct one per server."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.ttft_s = Histogram(
            PREFIX + "time_to_first_token_seconds", "Request arrival to first token.",
            ["slo_class"], buckets=TTFT_BUCKETS_S, registry=reg,
        )
        self.tpot_s = Histogram(
            PREFIX + "time_per_output_token_seconds",
            "Mean time per output token after the first, one sample per request.",
            ["slo_class"], buckets=TPOT_BUCKETS_S, registry=reg,
        )
        self.e2e_s = Histogram(
            PREFIX + "e2e_request_latency_seconds", "Request arrival to last token.",
            ["slo_class"], buckets=E2E_BUCKETS_S, registry=reg,
        )
        self.requests = Counter(
            PREFIX + "requests", "Requests by how they ended.", ["outcome", "reason"], registry=reg,
        )
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of admitted requests.", registry=reg)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated.", registry=reg)
        self.admission_rejections = Counter(
            PREFIX + "admission_rejections", "Requests turned away by admission.", ["reason"], registry=reg,
        )
        self.queue_depth = Gauge(
            PREFIX + "queue_depth", "Requests waiting in a queue.", ["queue", "instance"], registry=reg,
        )
        self.running_requests = Gauge(
            PREFIX + "running_requests", "Requests in flight.", ["instance", "role"], registry=reg,
        )
        self.kv_blocks_used = Gauge(
            PREFIX + "kv_blocks_used", "KV cache blocks in use.", ["instance", "role"], registry=reg,
        )
        self.kv_blocks_free = Gauge(
            PREFIX + "kv_blocks_free", "KV cache blocks free.", ["instance", "role"], registry=reg,
        )
        self.kv_transfer_bytes = Counter(
            PREFIX + "kv_transfer_bytes", "KV bytes moved between instances.", ["transport"], registry=reg,
        )
        self.kv_transfer_s = Histogram(
            PREFIX + "kv_transfer_seconds", "Duration of one request's KV transfer.",
            ["transport"], buckets=TRANSFER_BUCKETS_S, registry=reg,
        )
        self.kv_transfer_failures = Counter(
            PREFIX + "kv_transfer_failures", "Failed KV transfers.", ["transport", "reason"], registry=reg,
        )
        self.migrations = Counter(
            PREFIX + "migrations", "Live decode migrations by result.", ["outcome"], registry=reg,
        )
        self.role_flips = Counter(
            PREFIX + "role_flips", "Instances that changed role.", ["from_role", "to_role"], registry=reg,
        )
        self.pool_size = Gauge(
            PREFIX + "pool_size", "Instances per pool, planned and actual.", ["role", "kind"], registry=reg,
        )
        self.slo_attainment = Gauge(
            PREFIX + "slo_attainment", "Recent fraction of requests meeting their SLO.", ["slo_class"],
            registry=reg,
        )

    # --- recorded by the HTTP front end -------------------------------------------------------

    def record_first_token(self, slo_class: str, ttft_s: float) -> None:
        """One request's time to first token."""
        self.ttft_s.labels(slo_class).observe(ttft_s)

    def record_finished(
        self, slo_class: str, e2e_s: float, ttft_s: float, output_tokens: int, prompt_tokens: int
    ) -> None:
        """A request that produced tokens: e2e, TPOT (when it has >1 token) and token counts."""
        self.e2e_s.labels(slo_class).observe(e2e_s)
        if output_tokens > 1:
            self.tpot_s.labels(slo_class).observe((e2e_s - ttft_s) / (output_tokens - 1))
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(output_tokens)

    def record_outcome(self, outcome: RequestOutcome, reason: str = "") -> None:
        """Count one request's end; ``reason`` is a short code (error type, reject reason)."""
        self.requests.labels(outcome.value, reason).inc()

    # --- recorded by admission, routers, workers, the controller -----------------------------

    def record_rejection(self, reason: str) -> None:
        """Admission turned a request away for ``reason`` (e.g. ``overloaded``)."""
        self.admission_rejections.labels(reason).inc()

    def set_queue_depth(self, queue: str, instance: str, depth: int) -> None:
        """Requests waiting in ``queue`` (e.g. ``router``, ``prefill``, ``decode``) at ``instance``."""
        self.queue_depth.labels(queue, instance).set(depth)

    def set_running_requests(self, instance: str, role: str, running: int) -> None:
        """Requests currently running on ``instance``."""
        self.running_requests.labels(instance, role).set(running)

    def set_kv_blocks(self, instance: str, role: str, used_blocks: int, free_blocks: int) -> None:
        """KV cache occupancy of ``instance`` in blocks."""
        self.kv_blocks_used.labels(instance, role).set(used_blocks)
        self.kv_blocks_free.labels(instance, role).set(free_blocks)

    def forget_instance(self, instance: str, role: str) -> None:
        """Drop ``instance``'s per-instance gauges in ``role``: it left the view, or serves another role now."""
        # A gauge keeps its last value until its label set is removed: a dead worker's KV blocks would stay.
        for gauge in (self.running_requests, self.kv_blocks_used, self.kv_blocks_free):
            gauge.remove(instance, role)
        self.queue_depth.remove(role, instance)

    def record_kv_transfer(self, transport: str, num_bytes: int, duration_s: float) -> None:
        """One completed KV transfer over ``transport`` (``tcp``, ``shm``, ...)."""
        self.kv_transfer_bytes.labels(transport).inc(num_bytes)
        self.kv_transfer_s.labels(transport).observe(duration_s)

    def record_kv_transfer_failure(self, transport: str, reason: str) -> None:
        """One failed KV transfer (``timeout``, ``checksum``, ``peer_died``, ...)."""
        self.kv_transfer_failures.labels(transport, reason).inc()

    def record_migration(self, outcome: str) -> None:
        """One live migration ended with ``outcome`` (``completed``, ``failed``, ``cancelled``)."""
        self.migrations.labels(outcome).inc()

    def record_role_flip(self, from_role: str, to_role: str) -> None:
        """One instance changed role."""
        self.role_flips.labels(from_role, to_role).inc()

    def set_pool_size(self, role: str, target: int, actual: int) -> None:
        """The planner's target and the actual number of instances of ``role``."""
        self.pool_size.labels(role, "target").set(target)
        self.pool_size.labels(role, "actual").set(actual)

    def set_slo_attainment(self, slo_class: str, fraction: float) -> None:
        """Recent SLO attainment of ``slo_class`` (0..1)."""
        self.slo_attainment.labels(slo_class).set(fraction)

    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)
