"""The controller: places worker pools, watches them, replaces the dead, publishes snapshots.

It is off the token path: routers fetch a ``ClusterView`` (a core
``ClusterSnapshot`` plus every worker's gRPC address) and then talk to workers
directly, so serving continues while the controller restarts.

Life of the controller:
1. ``start`` (first call of any method): adopt the live named workers of this
   cluster (after a restart) or, on a fresh cluster, create the placement
   groups and one worker per slot. Every listed worker's generation counts as
   used, adopted or not, so a refill never takes the name of a stalled one.
2. Every ``health_interval_s``: probe each worker (gRPC load report; a failed
   probe asks Ray whether the actor still exists), let the core's ``supervise``
   decide health marks, replacements and new starts, carry them out (a
   replacement reuses its slot's placement bundle, under a new id: a slot's
   generation only increases), and publish a new view with a larger version.
   A slot whose start failed is not started again before its backoff (1 s,
   doubling up to 30 s, reset by a start that succeeds) has passed.
3. ``shutdown``: cancel the starts still running, kill the workers and remove every
   placement group of this cluster (found by name, pending ones too, so groups made
   by an earlier incarnation go as well).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from orchestrator.core.supervision import SupervisionConfig, WorkerStatus, supervise
from orchestrator.core.types import ClusterSnapshot, InstanceHealth, InstanceLoad, Role
from orchestrator.runtime.placement import (
    BundleShape,
    GroupPlan,
    PlacementStrategy,
    Slot,
    instance_id_of,
    parse_instance_id,
    plan_groups,
)
from workers.service.host import WorkerSpec
from workers.service.types import WorkerEndpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """What the controller deploys and how it supervises it."""

    model_dir: str
    cluster: str = "pdserve"  # prefix of actor and placement-group names
    num_prefill: int = 1
    num_decode: int = 1
    transport: str = "tcp"  # KV transport between the pools
    kv_poll_us: float | None = None  # KV receivers' poll before sleeping (EndpointOptions.poll_us; None: its default)
    kv_tcp_congestion: str | None = None  # tcp KV senders' congestion control (SenderOptions; None: its default)
    placement: PlacementStrategy = PlacementStrategy.PACK
    num_gpus_per_worker: float = 1.0  # = TP degree on GPUs; logical GPUs on a laptop
    num_cpus_per_worker: float = 1.0
    tp_degree: int = 1
    device: str = "cpu"
    worker_host: str = "127.0.0.1"  # interface workers bind and advertise
    num_kv_blocks: int | None = None
    max_num_seqs: int = 64
    health_interval_s: float = 0.5
    probe_timeout_s: float = 2.0
    worker_start_timeout_s: float = 120.0
    start_backoff_s: float = 1.0  # wait after a slot's first failed start; doubles per failure in a row
    max_start_backoff_s: float = 30.0
    supervision: SupervisionConfig = field(default_factory=SupervisionConfig)

    def __post_init__(self) -> None:
        if self.num_prefill < 0 or self.num_decode < 1:
            raise ValueError(f"need num_prefill >= 0 and num_decode >= 1, got {self.num_prefill}, {self.num_decode}")
        if self.health_interval_s <= 0:
            raise ValueError(f"health_interval_s must be > 0, got {self.health_interval_s}")
        if not 0 < self.start_backoff_s <= self.max_start_backoff_s:
            raise ValueError(
                f"need 0 < start_backoff_s <= max_start_backoff_s, got {self.start_backoff_s}, "
                f"{self.max_start_backoff_s}"
            )

    @property
    def targets(self) -> dict[Role, int]:
        """Desired pool sizes."""
        return {Role.PREFILL: self.num_prefill, Role.DECODE: self.num_decode}

    @property
    def shape(self) -> BundleShape:
        """Resources of one worker."""
        return BundleShape(self.num_cpus_per_worker, self.num_gpus_per_worker)


@dataclass(frozen=True, slots=True)
class ClusterView:
    """What routers need: the load snapshot and how to reach each instance in it."""

    snapshot: ClusterSnapshot
    endpoints: tuple[WorkerEndpoint, ...]

    def endpoint(self, instance_id: str) -> WorkerEndpoint | None:
        """The endpoint of ``instance_id``, if known."""
        for ep in self.endpoints:
            if ep.instance_id == instance_id:
                return ep
        return None


def start_backoff_s(failed_starts: int, base_s: float = 1.0, cap_s: float = 30.0) -> float:
    """Wait before a slot's next start after ``failed_starts`` failed starts in a row: 0, base, 2 base, ... cap."""
    if failed_starts <= 0:
        return 0.0
    return min(cap_s, base_s * 2.0 ** min(failed_starts - 1, 64))  # the exponent is capped: no overflow


@dataclass
class SlotStarts:
    """Per slot, the next worker generation and the backoff after failed starts (no I/O; time is passed in).

    Generations only increase, so an instance id is never reused: metric labels and routers' suspect
    lists of a dead worker never apply to its replacement.
    """

    base_s: float = 1.0
    cap_s: float = 30.0
    _next_generation: dict[Slot, int] = field(default_factory=dict)
    _failures: dict[Slot, int] = field(default_factory=dict)
    _retry_at_s: dict[Slot, float] = field(default_factory=dict)

    def claim(self, slot: Slot) -> int:
        """The generation of the worker about to start in ``slot`` (never handed out again)."""
        generation = self._next_generation.get(slot, 0)
        self._next_generation[slot] = generation + 1
        return generation

    def seen(self, slot: Slot, generation: int) -> None:
        """A worker of ``generation`` exists in ``slot`` (e.g. adopted): later claims go above it."""
        self._next_generation[slot] = max(self._next_generation.get(slot, 0), generation + 1)

    def failed(self, slot: Slot, now_s: float) -> float:
        """Record a failed start at ``now_s``; returns the wait before the slot may start again."""
        failures = self._failures.get(slot, 0) + 1
        self._failures[slot] = failures
        delay_s = start_backoff_s(failures, self.base_s, self.cap_s)
        self._retry_at_s[slot] = now_s + delay_s
        return delay_s

    def succeeded(self, slot: Slot) -> None:
        """A start in ``slot`` worked: the next failure waits ``base_s`` again."""
        self._failures.pop(slot, None)
        self._retry_at_s.pop(slot, None)

    def ready(self, slot: Slot, now_s: float) -> bool:
        """Whether ``slot`` may start a worker at ``now_s``."""
        return now_s >= self._retry_at_s.get(slot, -math.inf)


@dataclass
class _Worker:
    slot: Slot
    generation: int
    handle: Any
    endpoint: WorkerEndpoint
    client: Any  # WorkerClient, created on the controller's event loop
    failures: int = 0
    alive: bool = True
    health: InstanceHealth = InstanceHealth.HEALTHY  # as the last supervision round decided
    load: InstanceLoad | None = None


def _kill(handle: Any) -> None:
    import ray

    try:
        ray.kill(handle, no_restart=True)
    except Exception:  # already gone
        pass


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("starting a worker failed: %s", task.exception())


class Controller:
    """Plain controller class; ``builder.start_controller`` makes it a restartable Ray actor."""

    def __init__(self, config: ClusterConfig, namespace: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.namespace = namespace
        self._clock = clock  # monotonic seconds, for start backoffs
        self._starts = SlotStarts(config.start_backoff_s, config.max_start_backoff_s)
        self._workers: dict[str, _Worker] = {}
        self._starting: set[Slot] = set()
        self._groups: dict[Slot, tuple[Any, int]] = {}  # slot -> (placement group, bundle index)
        self._version = 0
        self._view = ClusterView(ClusterSnapshot(at_s=0.0), ())
        self._started: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()  # bring-up and worker starts still running
        self._loop_task: asyncio.Task[None] | None = None
        self._adopted = 0
        self.replacements = 0

    # --- start-up ---------------------------------------------------------------------------
    async def start(self) -> int:
        """Adopt or create the workers and start supervising; returns how many workers were adopted."""
        if self._started is None:
            self._started = self._track(asyncio.create_task(self._bring_up()))
        started = self._started
        try:
            await asyncio.shield(started)
        except Exception:
            if self._started is started:  # a failed bring-up is tried again by the next call
                self._started = None
            raise
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._supervise_forever())
        return self._adopted

    async def _bring_up(self) -> None:
        from orchestrator.runtime import builder

        groups = plan_groups(self.config.num_prefill, self.config.num_decode, self.config.placement)
        for plan in groups:
            await self._ensure_group(plan)
        # Workers that outlived a previous controller incarnation keep serving: adopt them.
        import ray

        prefix = builder.worker_actor_name(self.config.cluster, "")
        for name in builder.list_workers(self.config.cluster, self.namespace):
            # Its generation counts as used even if it is not adopted: a stalled worker still holds its name.
            with contextlib.suppress(ValueError):  # a foreign name
                self._starts.seen(*parse_instance_id(name.removeprefix(prefix)))
            try:
                handle = ray.get_actor(name, namespace=self.namespace)
                endpoint: WorkerEndpoint = await asyncio.wait_for(
                    handle.endpoint.remote(), self.config.probe_timeout_s
                )
                slot, generation = parse_instance_id(endpoint.instance_id)
            except Exception as exc:  # dead, stalled or foreign: the slot is refilled below
                log.warning("not adopting %s: %s", name, exc)
                continue
            self._register(slot, generation, handle, endpoint)
            self._adopted += 1
        have = {w.slot for w in self._workers.values()}
        missing = [slot for plan in groups for slot in plan.slots if slot not in have]
        await asyncio.gather(*(self._start_in_slot(slot) for slot in missing))
        self._publish()

    async def _ensure_group(self, plan: GroupPlan) -> None:
        from orchestrator.runtime import builder

        pg = await asyncio.to_thread(builder.ensure_group, self.config.cluster, plan, self.config.shape)
        for index, slot in enumerate(plan.slots):
            self._groups[slot] = (pg, index)

    async def _start_in_slot(self, slot: Slot) -> None:
        """Start a worker of a new generation in ``slot``; a failure is logged, starts its backoff and is raised."""
        from orchestrator.runtime import builder

        generation = self._starts.claim(slot)
        instance_id = instance_id_of(slot, generation)
        spec = WorkerSpec(
            instance_id=instance_id,
            role=slot.role,
            model_dir=self.config.model_dir,
            transport=self.config.transport,
            host=self.config.worker_host,
            device=self.config.device,
            num_kv_blocks=self.config.num_kv_blocks,
            max_num_seqs=self.config.max_num_seqs,
            tp_degree=self.config.tp_degree,
            kv_poll_us=self.config.kv_poll_us,
            kv_tcp_congestion=self.config.kv_tcp_congestion,
        )
        self._starting.add(slot)
        handle = None
        try:
            if slot not in self._groups:
                await self._ensure_group(GroupPlan(slot.name, self.config.placement, (slot,)))
            pg, index = self._groups[slot]
            handle = builder.start_worker(self.config.cluster, self.namespace, spec, self.config.shape, pg, index)
            endpoint = await asyncio.wait_for(handle.endpoint.remote(), self.config.worker_start_timeout_s)
        except Exception as exc:
            delay_s = self._starts.failed(slot, self._clock())
            log.warning("starting worker %s failed (next try in %.1f s): %r", instance_id, delay_s, exc)
            if handle is not None:  # a half-started actor would hold the bundle the next try needs
                _kill(handle)
            raise
        finally:
            self._starting.discard(slot)
        self._starts.succeeded(slot)
        self._register(slot, generation, handle, endpoint)

    async def _start_or_back_off(self, slot: Slot) -> None:
        # A failed start was logged and its backoff set in _start_in_slot; a later round retries it.
        with contextlib.suppress(Exception):
            await self._start_in_slot(slot)

    def _register(self, slot: Slot, generation: int, handle: Any, endpoint: WorkerEndpoint) -> None:
        from orchestrator.runtime.worker_client import WorkerClient

        self._starts.seen(slot, generation)
        self._workers[endpoint.instance_id] = _Worker(slot, generation, handle, endpoint, WorkerClient(endpoint.grpc_address))

    # --- supervision ----------------------------------------------------------------------------
    async def _supervise_forever(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.supervise_once()
            except Exception:
                log.exception("supervision round failed")
            await asyncio.sleep(max(0.0, self.config.health_interval_s - (time.monotonic() - started)))

    async def _probe(self, worker: _Worker) -> None:
        try:
            worker.load = await worker.client.load(time.time(), timeout_s=self.config.probe_timeout_s)
            worker.failures = 0
            return
        except Exception:
            worker.failures += 1
        try:
            engine_runs = await asyncio.wait_for(worker.handle.ping.remote(), self.config.probe_timeout_s)
        except asyncio.TimeoutError:
            pass  # alive but unresponsive: the failure count decides
        except Exception:  # RayActorError and friends: the process is gone
            worker.alive = False
        else:
            if engine_runs is False:  # the process answers but its engine loop has stopped: it never recovers
                worker.alive = False

    async def supervise_once(self) -> None:
        """One round: probe, decide (core ``supervise``), act, publish."""
        await asyncio.gather(*(self._probe(w) for w in list(self._workers.values())))
        # Read after the probes: a start that finished meanwhile is in _workers, no longer in _starting.
        workers = list(self._workers.values())
        statuses = [WorkerStatus(w.endpoint.instance_id, w.slot.role, w.alive, w.failures) for w in workers]
        # Slots being (re)started count as present so they are not started twice.
        statuses += [WorkerStatus(f"starting:{s.name}", s.role, True) for s in self._starting]
        plan = supervise(statuses, self.config.targets, self.config.supervision)
        health = dict(plan.health)
        for w in workers:
            w.health = health.get(w.endpoint.instance_id, InstanceHealth.UNHEALTHY)
        for instance_id in plan.replace:
            self._replace(instance_id)
        now_s = self._clock()
        for role, count in Counter(plan.start).items():
            used = {w.slot.index for w in self._workers.values() if w.slot.role is role}
            used |= {s.index for s in self._starting if s.role is role}
            # The lowest free slots; one still backing off from a failed start waits for a later round.
            for index in itertools.islice((i for i in itertools.count() if i not in used), count):
                slot = Slot(role, index)
                if self._starts.ready(slot, now_s):
                    self._starting.add(slot)  # claimed now, so this round does not pick it twice
                    self._spawn(self._start_or_back_off(slot))
        self._publish()

    def _spawn(self, coro: Any) -> None:
        self._track(asyncio.create_task(coro)).add_done_callback(_log_failure)

    def _track(self, task: asyncio.Task[Any]) -> asyncio.Task[Any]:
        """Keep ``task`` until it ends, so that ``shutdown`` can cancel it."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _replace(self, instance_id: str) -> None:
        worker = self._workers.pop(instance_id, None)
        if worker is None:
            return
        self.replacements += 1
        log.warning("replacing worker %s (alive=%s, failures=%d)", instance_id, worker.alive, worker.failures)
        _kill(worker.handle)
        self._starting.add(worker.slot)  # claimed now, so the next round does not start it again
        self._spawn(self._start_or_back_off(worker.slot))

    def _publish(self) -> None:
        instances = []
        for w in sorted(self._workers.values(), key=lambda w: (w.slot.role.value, w.slot.index)):
            if w.load is None:  # not probed successfully yet
                load = InstanceLoad(
                    instance_id=w.endpoint.instance_id, role=w.slot.role, node_id=w.endpoint.node_id, health=w.health
                )
            else:
                load = replace(w.load, health=w.health)
            instances.append(load)
        # Versions are millisecond timestamps (and strictly increasing), so they keep increasing
        # across controller restarts and routers never mistake a new view for an old one.
        self._version = max(self._version + 1, int(time.time() * 1000))
        snapshot = ClusterSnapshot(at_s=time.time(), instances=tuple(instances), version=self._version)
        endpoints = tuple(w.endpoint for w in self._workers.values())
        self._view = ClusterView(snapshot, endpoints)

    # --- API for routers and operators ------------------------------------------------------------
    async def get_view(self, newer_than: int = -1) -> ClusterView | None:
        """The latest view, or None when it is not newer than ``newer_than``."""
        await self.start()
        return self._view if self._view.snapshot.version > newer_than else None

    async def status(self) -> dict[str, int]:
        """Counters for operators and tests: workers, starting, replacements, adopted."""
        await self.start()
        return {
            "workers": len(self._workers),
            "starting": len(self._starting),
            "replacements": self.replacements,
            "adopted": self._adopted,
            "version": self._version,
        }

    async def shutdown(self) -> None:
        """Cancel the starts still running, kill every worker and remove the placement groups of this cluster."""
        import ray

        from orchestrator.runtime import builder

        if self._loop_task is not None:
            self._loop_task.cancel()
        # Cancelled first, so that no start creates a worker or a group after the clean-up below.
        for task in list(self._tasks):
            task.cancel()
        for worker in list(self._workers.values()):
            try:
                await asyncio.wait_for(worker.handle.stop.remote(), 5.0)
            except Exception:
                pass
            ray.kill(worker.handle, no_restart=True)
        self._workers.clear()
        # Workers still starting are found by name.
        for name in builder.list_workers(self.config.cluster, self.namespace):
            try:
                ray.kill(ray.get_actor(name, namespace=self.namespace), no_restart=True)
            except Exception:
                pass
        builder.remove_groups(self.config.cluster)
        self._groups.clear()
