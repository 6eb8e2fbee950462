"""A worker process's whole setup: engine, engine loop, KV transport, worker and gRPC server.

``WorkerHost(spec)`` builds everything and starts serving in its constructor,
so one call (a Ray actor's creation, or a test) yields a ready worker whose
``endpoint()`` tells routers where to reach it. The class is plain; the Ray
decorator is applied in ``orchestrator.runtime.builder``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from orchestrator.core.types import Role
from workers.kv.interface import EndpointOptions, SenderOptions
from workers.service.engine_loop import EngineLoop
from workers.service.types import WorkerEndpoint


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """Everything needed to start one prefill or decode worker."""

    instance_id: str
    role: Role  # PREFILL or DECODE
    model_dir: str
    transport: str = "tcp"  # KV transport: tcp, shm, torch_dist, memory
    host: str = "127.0.0.1"  # interface for gRPC and the KV endpoint, advertised to routers
    device: str = "cpu"
    num_kv_blocks: int | None = None  # None: derived from the engine's KV budget
    max_num_seqs: int = 64  # decode batch size at most
    tp_degree: int = 1  # tensor-parallel degree (recorded; the engine runs one device per worker)
    node_id: str | None = None  # None: the Ray node id, or the host name outside Ray
    kv_poll_us: float | None = None  # the KV receiver's EndpointOptions.poll_us (None: its default)
    kv_tcp_congestion: str | None = None  # the KV sender's SenderOptions.tcp_congestion (None: its default)

    def __post_init__(self) -> None:
        if self.role not in (Role.PREFILL, Role.DECODE):
            raise ValueError(f"a worker is prefill or decode, not {self.role.value}")
        if not self.instance_id:
            raise ValueError("instance_id must be non-empty")
        kv_options(self)  # bad KV knobs fail here, not in the worker process


def kv_options(spec: WorkerSpec) -> tuple[EndpointOptions, SenderOptions]:
    """The KV endpoint's and sender's options a worker spec asks for (ValueError for bad values)."""
    # torch_dist stages on the GPU of a CUDA worker, so its pairs can use NCCL (workers.kv.pair_groups.pair_device)
    staging = spec.device if spec.transport == "torch_dist" and spec.device.startswith("cuda") else "cpu"
    endpoint = EndpointOptions(host=spec.host, device=staging)
    if spec.kv_poll_us is not None:
        endpoint = dataclasses.replace(endpoint, poll_us=spec.kv_poll_us)  # EndpointOptions checks the value
    sender = SenderOptions(device=spec.device)
    if spec.kv_tcp_congestion is not None:
        sender = dataclasses.replace(sender, tcp_congestion=spec.kv_tcp_congestion)  # SenderOptions checks it
    return endpoint, sender


def _node_id() -> str:
    try:
        import ray

        if ray.is_initialized():
            return str(ray.get_runtime_context().get_node_id())
    except ImportError:
        pass
    return os.uname().nodename


class WorkerHost:
    """Builds and runs one worker; ``stop()`` tears it down."""

    def __init__(self, spec: WorkerSpec) -> None:
        import torch

        from workers.engine.config import EngineConfig, EngineRole
        from workers.engine.engine import LLMEngine
        from workers.kv.registry import KVClient, open_endpoint
        from workers.service.decode import DecodeWorker
        from workers.service.prefill import PrefillWorker
        from workers.service.server import WorkerServer

        torch.set_num_threads(1)  # one intra-op thread per worker process (see MACHINE_NOTES)
        self.spec = spec
        node_id = spec.node_id or _node_id()
        role = EngineRole.PREFILL_ONLY if spec.role is Role.PREFILL else EngineRole.DECODE_ONLY
        config = EngineConfig(
            device=spec.device, num_blocks=spec.num_kv_blocks, max_num_seqs=spec.max_num_seqs, role=role
        )
        self.loop = EngineLoop(LLMEngine(spec.model_dir, config), name=f"engine-{spec.instance_id}")
        self.worker: DecodeWorker | PrefillWorker
        endpoint_options, sender_options = kv_options(spec)
        if spec.role is Role.DECODE:
            endpoint = open_endpoint(spec.transport, endpoint_options)
            self.worker = DecodeWorker(self.loop, endpoint, spec.instance_id, node_id)
        else:
            self.worker = PrefillWorker(self.loop, KVClient(sender_options), spec.instance_id, node_id)
        self.server = WorkerServer(self.worker, host=spec.host)
        address = self.server.start()
        self._endpoint = WorkerEndpoint(spec.instance_id, spec.role, node_id, address, spec.transport)

    def endpoint(self) -> WorkerEndpoint:
        """Where routers reach this worker."""
        return self._endpoint

    def ping(self) -> bool:
        """Liveness: the engine loop runs."""
        return self.worker.healthy

    def stop(self) -> None:
        """Stop serving and free the engine."""
        self.server.stop()
        self.worker.close()
