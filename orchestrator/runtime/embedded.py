"""Start the whole live system in one call: Ray, controller, workers, router and HTTP front end.

``start_embedded`` is what ``pdserve up`` and ``pdserve quickstart`` run and
what integration tests use. Without ``address`` it starts a private local Ray
(logical GPUs and one custom resource per pool, no dashboard) unless this
process already has Ray initialized; with ``address`` it joins that cluster.
``stop()`` tears down exactly what it started, in reverse order: HTTP server,
router, workers and placement groups (through the controller), controller,
and Ray only if it started it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.runtime.controller import ClusterConfig
from orchestrator.runtime.disagg_backend import ControllerViews, DisaggregatedBackend, RouterConfig
from orchestrator.runtime.placement import PlacementStrategy

log = logging.getLogger(__name__)

RAY_NAMESPACE = "pdserve"


@dataclass
class EmbeddedHandle:
    """A running embedded deployment: its URL, parts, and ``stop()``."""

    url: str
    model_dir: Path
    cluster: ClusterConfig
    controller: Any
    backend: DisaggregatedBackend
    server: Any  # orchestrator.runtime.http.ServerHandle
    namespace: str
    started_ray: bool
    _stopped: bool = field(default=False, repr=False)

    def stop(self) -> None:
        """Stop everything this deployment started (idempotent)."""
        import ray

        if self._stopped:
            return
        self._stopped = True
        try:
            self.server.stop()
        finally:
            try:
                ray.get(self.controller.shutdown.remote(), timeout=60)
            except Exception as exc:
                log.warning("controller shutdown failed: %s", exc)
            try:
                ray.kill(self.controller, no_restart=True)
            except Exception:
                pass
            if self.started_ray:
                ray.shutdown()


def _repo_on_worker_path() -> None:
    """Let Ray worker processes import pdserve when it runs from a source tree (not installed)."""
    root = str(Path(__file__).resolve().parents[2])
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in [str(Path(p).resolve()) for p in paths]:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])


LOCAL_GCS_RECONNECT_S = 15  # how long a process of the private local Ray waits for its lost GCS before exiting


def local_gpu_problem() -> str | None:
    """Why this machine cannot give workers CUDA devices (None: torch sees at least one)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return None
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return f"torch {torch.__version__} ({build}) sees no CUDA device on this machine"


def gpu_share(num_gpus: int, workers: int) -> float:
    """GPUs each worker asks Ray for: one each when there are enough, else an even share of one GPU.

    A share is 1/k, so k workers fill a GPU exactly and none straddles two (Ray places a fraction on one GPU).
    """
    if num_gpus < 1 or workers < 1:
        raise ValueError(f"need at least one GPU and one worker, got {num_gpus} and {workers}")
    if num_gpus >= workers:
        return 1.0
    return 1.0 / math.ceil(workers / num_gpus)


def init_local_ray(num_prefill: int, num_decode: int, num_cpus: int | None = None,
                   num_gpus: int | None = None) -> None:
    """Start a private local Ray with one custom resource per pool.

    ``num_gpus``: the GPUs it offers; None offers one logical GPU per worker (a machine without GPUs).
    """
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster; see docs for clusters
    # Ray's processes here die with this one's process group (a service manager's SIGTERM to the group):
    # a driver then waited Ray's default 60 s for the dead GCS before it could exit
    os.environ.setdefault("RAY_gcs_rpc_server_reconnect_timeout_s", str(LOCAL_GCS_RECONNECT_S))
    _repo_on_worker_path()
    workers = num_prefill + num_decode
    ray.init(
        address="local",
        namespace=RAY_NAMESPACE,
        num_cpus=num_cpus or workers + 2,
        num_gpus=workers if num_gpus is None else num_gpus,
        resources={"prefill_pool": float(max(num_prefill, 1)), "decode_pool": float(num_decode)},
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )


def start_embedded(
    *,
    num_prefill: int = 1,
    num_decode: int = 1,
    model_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    transport: str = "tcp",
    kv_poll_us: float | None = None,
    kv_tcp_congestion: str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    api_key: str | None = None,
    placement: PlacementStrategy = PlacementStrategy.PACK,
    address: str | None = None,
    cluster_name: str | None = None,
    num_kv_blocks: int | None = 512,
    router: RouterConfig | None = None,
    health_interval_s: float = 0.5,
    controller_max_restarts: int = -1,
    slo_classes: Sequence[str] = (),
    device: str = "cpu",
) -> EmbeddedHandle:
    """Start Ray (if needed), the controller and its workers, the router, and the HTTP server.

    ``slo_classes``: SLO classes the front end accepts in ``x-pdserve-slo-class`` besides ``default``.
    ``device``: "cpu", or "cuda" for workers on the GPUs Ray assigns them (the local Ray offers this
    machine's GPUs then, not logical ones).
    """
    import ray

    from orchestrator.core.admission import AdmissionConfig, context_window
    from orchestrator.runtime import builder
    from orchestrator.runtime.http import ServerLimits, create_app, serve
    from orchestrator.runtime.http.config import DEFAULT_SLO_CLASS
    from orchestrator.runtime.http.tokenizer import load_hf_tokenizer
    from orchestrator.runtime.metrics import ServingMetrics
    from workers.engine.loader import load_model_config, load_tokenizer
    from workers.engine.tiny import ensure_tiny_model

    limits = ServerLimits(slo_classes=frozenset({DEFAULT_SLO_CLASS, *slo_classes}))  # invalid names fail first
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda' (each worker uses the GPU Ray gives it), got {device!r}")
    gpus_per_worker = 1.0
    local_gpus: int | None = None  # None: logical GPUs, one per worker
    if device == "cuda" and address is None:
        problem = local_gpu_problem()
        if problem is not None:
            raise RuntimeError(f"device cuda: {problem}")
        import torch

        local_gpus = torch.cuda.device_count()
        gpus_per_worker = gpu_share(local_gpus, num_prefill + num_decode)
    if model_dir is None:
        model_path = ensure_tiny_model(cache_dir)
    else:
        model_path = Path(model_dir)
        if not (model_path / "config.json").is_file():
            raise FileNotFoundError(f"--model {model_path}: no config.json there (expected a Hugging Face model dir)")
    started_ray = False
    if not ray.is_initialized():
        if address is not None:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            ray.init(address=address, namespace=RAY_NAMESPACE, log_to_driver=False)
        else:
            init_local_ray(num_prefill, num_decode, num_gpus=local_gpus)
        started_ray = True
    namespace = ray.get_runtime_context().namespace or RAY_NAMESPACE
    cluster = ClusterConfig(
        model_dir=str(model_path.resolve()),
        cluster=cluster_name or f"pdserve-{uuid.uuid4().hex[:6]}",
        num_prefill=num_prefill,
        num_decode=num_decode,
        transport=transport,
        kv_poll_us=kv_poll_us,
        kv_tcp_congestion=kv_tcp_congestion,
        placement=placement,
        num_gpus_per_worker=gpus_per_worker,
        device=device,
        num_kv_blocks=num_kv_blocks,
        health_interval_s=health_interval_s,
    )
    controller = builder.start_controller(cluster, namespace, detached=False, max_restarts=controller_max_restarts)
    try:
        ray.get(controller.start.remote(), timeout=cluster.worker_start_timeout_s + 60)
        view = ray.get(controller.get_view.remote())
        # the window the workers enforce, advertised and admitted as such: a larger one would cut requests short
        window = context_window(load_model_config(model_path).max_position_embeddings, view.snapshot)
        limits = dataclasses.replace(limits, max_context_tokens=window)
        if router is None:
            router = RouterConfig(admission=AdmissionConfig(max_context_tokens=window))
        else:  # a router's own window may be narrower than the workers', never wider
            admission = dataclasses.replace(
                router.admission, max_context_tokens=min(router.admission.max_context_tokens, window)
            )
            router = dataclasses.replace(router, admission=admission)
        info = load_tokenizer(model_path)
        metrics = ServingMetrics()
        backend = DisaggregatedBackend(ControllerViews(controller), info, router, initial_view=view, metrics=metrics)
        app = create_app(backend, load_hf_tokenizer(model_path), model_path.name, api_key=api_key, metrics=metrics,
                         limits=limits)
        server = serve(app, host, port)
    except BaseException:
        try:
            ray.get(controller.shutdown.remote(), timeout=60)
        finally:
            ray.kill(controller, no_restart=True)
            if started_ray:
                ray.shutdown()
        raise
    return EmbeddedHandle(server.url, model_path, cluster, controller, backend, server, namespace, started_ray)
