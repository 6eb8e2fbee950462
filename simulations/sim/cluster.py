"""A simulated cluster: pools of instances, the core's admission and routing, KV flows.

A request's life in the simulator mirrors the live system:
1. arrival (from the trace, plus ``request_overhead_s`` for the hops before
   the router) -> ``admit`` over the router's view of the cluster:
   admit, queue at the router (retried when the view refreshes), or reject;
2. ``route`` picks P and D (disaggregated), D alone (short prompt or no
   prefill pool), or a colocated instance; the same functions run in the
   live router;
3. prefill on P; D reserves blocks (or the request waits in D's
   ``pending_in``), then the KV moves as a flow over the links;
4. D decodes; the request finishes or is explicitly rejected — never lost
   (``Recorder.check_conservation`` at the end of every run).

The router's view is what the live router sees: a snapshot of the instances
taken at most ``router_refresh_s`` ago, with every routing decision since booked
into it by the core's ``apply_route``. With ``router_refresh_s = 0`` the view
is rebuilt on every arrival (a router with perfect, instant information) and
queued requests are retried after every step that made progress; otherwise
they are retried when the view next refreshes, as the live router's waiting
requests see the cluster change only through a fresher view.

A controller tick (optional) hands a fresh snapshot to a ``ControlPolicy`` and
applies the decisions it returns; migration, role flips and planning plug in
there.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from orchestrator.core.admission import AdmissionConfig, AdmissionOutcome, admit
from orchestrator.core.routing import (
    NoRoute,
    RouteDecision,
    RouteMode,
    RoutingConfig,
    apply_route,
    carry_orders,
    route,
)
from orchestrator.core.slo import OverloadAction
from orchestrator.core.types import ClusterSnapshot, InstanceHealth, InstanceLoad, RequestInfo, Role
from simulations.latency.base import LatencyModel
from simulations.sim.cost import StepCoster
from simulations.sim.events import EventLoop, EventPriority, Scheduled
from simulations.sim.instance import BatchPolicy, Events, Instance, InstanceSpec, SimRequest
from simulations.sim.network import Endpoint, LinkConfig, Network
from simulations.sim.recorder import Recorder
from simulations.traces.trace import Trace


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """``count`` identical instances of one role."""

    role: Role
    count: int
    tp_degree: int = 1
    kv_blocks: int = 4096  # per instance
    policy: BatchPolicy = BatchPolicy.PREFILL_FIRST
    max_batched_tokens: int = 8192
    max_running_requests: int = 256

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError(f"pool {self.role.value}: count must be >= 0, got {self.count}")


# Mirrors the live router's refresh interval (``RouterConfig.refresh_interval_s`` in
# orchestrator/runtime/disagg_backend.py); kept here because simulations never import the runtime.
LIVE_ROUTER_REFRESH_S = 0.2


def _default_admission() -> AdmissionConfig:
    # The simulator serves every prompt the KV cache can hold; long prompts are
    # rejected by KV capacity, not by the live default's 2k context window.
    return AdmissionConfig(max_context_tokens=1 << 30, on_overload=OverloadAction.QUEUE)


@dataclass(frozen=True)
class ClusterConfig:
    """Everything that defines a simulated cluster except the latency model and the trace."""

    pools: tuple[PoolSpec, ...]
    block_size: int = 16
    gpus_per_node: int = 8
    links: LinkConfig = field(default_factory=LinkConfig)
    kv_bytes_per_token: float = 0.0  # 0: KV moves instantly
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    admission: AdmissionConfig = field(default_factory=_default_admission)
    control_interval_s: float | None = None  # None: no controller ticks
    timeline_bucket_s: float = 1.0
    jump_decode_steps: bool = True  # take unchanged decode batches as one event (same results)
    # Fixed delay of the HTTP/RPC hops before the router sees a request (no instance is busy
    # meanwhile). TTFT and e2e still count from the trace arrival, so both include it.
    request_overhead_s: float = 0.0
    # How old the router's view may get before it is rebuilt from the instances; in between,
    # decisions are booked into it. 0: rebuilt on every arrival (perfect, instant information).
    router_refresh_s: float = LIVE_ROUTER_REFRESH_S

    def __post_init__(self) -> None:
        if not 0.0 <= self.request_overhead_s < math.inf:  # also rejects NaN
            raise ValueError(f"request_overhead_s must be finite and >= 0, got {self.request_overhead_s}")
        if not 0.0 <= self.router_refresh_s < math.inf:
            raise ValueError(f"router_refresh_s must be finite and >= 0, got {self.router_refresh_s}")
        if not any(p.count for p in self.pools):
            raise ValueError("a cluster needs at least one instance")
        roles = {p.role for p in self.pools if p.count}
        if Role.PREFILL in roles and Role.DECODE not in roles:
            raise ValueError("a prefill pool needs a decode pool to hand requests to")
        for p in self.pools:
            if p.tp_degree > self.gpus_per_node:
                raise ValueError(f"tp_degree {p.tp_degree} exceeds gpus_per_node {self.gpus_per_node}")

    @property
    def num_gpus(self) -> int:
        """GPUs the cluster uses (sum of instance TP degrees)."""
        return sum(p.count * p.tp_degree for p in self.pools)

    @property
    def label(self) -> str:
        """Short name, e.g. ``2P(tp1)+1D(tp2)`` or ``4C(tp1)``."""
        letter = {Role.PREFILL: "P", Role.DECODE: "D", Role.COLOCATED: "C"}
        return "+".join(f"{p.count}{letter[p.role]}(tp{p.tp_degree})" for p in self.pools if p.count)


def colocated(count: int, tp_degree: int = 1, kv_blocks: int = 4096,
              policy: BatchPolicy = BatchPolicy.PREFILL_FIRST, **kwargs: object) -> ClusterConfig:
    """N colocated instances (the vLLM-style baseline)."""
    return ClusterConfig(pools=(PoolSpec(Role.COLOCATED, count, tp_degree, kv_blocks, policy),), **kwargs)  # type: ignore[arg-type]


def disaggregated(prefill: int, decode: int, prefill_tp: int = 1, decode_tp: int = 1,
                  prefill_kv_blocks: int = 4096, decode_kv_blocks: int = 4096, **kwargs: object) -> ClusterConfig:
    """DistServe-style static split: ``prefill`` P instances and ``decode`` D instances."""
    pools = (PoolSpec(Role.PREFILL, prefill, prefill_tp, prefill_kv_blocks),
             PoolSpec(Role.DECODE, decode, decode_tp, decode_kv_blocks))
    return ClusterConfig(pools=pools, **kwargs)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class SetHealth:
    """Decision: mark an instance healthy or draining (routing skips draining ones)."""

    instance_id: str
    health: InstanceHealth


ControlDecision = SetHealth


class ControlPolicy(Protocol):
    """Called on every controller tick with a fresh snapshot."""

    def decide(self, snapshot: ClusterSnapshot, now_s: float) -> Sequence[ControlDecision]:
        """Decisions to apply now (empty for none)."""
        ...


class NoControl:
    """The default controller: decides nothing."""

    def decide(self, snapshot: ClusterSnapshot, now_s: float) -> Sequence[ControlDecision]:
        """Return no decisions."""
        return ()


def place(config: ClusterConfig) -> list[InstanceSpec]:
    """Instance specs with node placement: pools in order, packed onto nodes of ``gpus_per_node``."""
    specs: list[InstanceSpec] = []
    node = 0
    free = config.gpus_per_node
    letter = {Role.PREFILL: "p", Role.DECODE: "d", Role.COLOCATED: "c"}
    for pool in config.pools:
        for i in range(pool.count):
            if pool.tp_degree > free:
                node += 1
                free = config.gpus_per_node
            free -= pool.tp_degree
            specs.append(InstanceSpec(
                instance_id=f"{letter[pool.role]}{i}", role=pool.role, kv_blocks=pool.kv_blocks,
                tp_degree=pool.tp_degree, node_id=f"node-{node}", block_size=config.block_size,
                max_running_requests=pool.max_running_requests, max_batched_tokens=pool.max_batched_tokens,
                policy=pool.policy,
            ))
    return specs


class ClusterSim:
    """One run of a trace through a simulated cluster."""

    def __init__(self, trace: Trace, model: LatencyModel, config: ClusterConfig,
                 control: ControlPolicy | None = None) -> None:
        self.trace = trace
        self.config = config
        self.control = control if control is not None else NoControl()
        self.loop = EventLoop()
        self.recorder = Recorder(len(trace))
        self.network = Network(config.links)
        self.instances: list[Instance] = []
        # One coster per TP degree: instances of a pool share its memo of step times.
        costers: dict[int, StepCoster] = {}
        for index, spec in enumerate(place(config)):
            coster = costers.get(spec.tp_degree)
            if coster is None:
                coster = costers[spec.tp_degree] = StepCoster(model, spec.tp_degree)
            self.instances.append(Instance(spec, index, coster, self.recorder, self,
                                           config.timeline_bucket_s, config.jump_decode_steps))
        self._by_id = {inst.spec.instance_id: inst for inst in self.instances}
        self._dirty_log: list[int] = []
        for inst in self.instances:
            inst.dirty_log = self._dirty_log
        self._endpoints = [Endpoint(i.spec.node_id, i.spec.instance_id, i.spec.tp_degree) for i in self.instances]
        self.router_queue: deque[SimRequest] = deque()
        self._arrival_s = trace.arrival_s.tolist()
        # When the router sees each request: its trace arrival plus the fixed request overhead.
        overhead_s = config.request_overhead_s
        self._seen_s = [a + overhead_s for a in self._arrival_s] if overhead_s else self._arrival_s
        self._prompt = trace.prompt_tokens.tolist()
        self._output = trace.output_tokens.tolist()
        self._snapshot: ClusterSnapshot | None = None
        self._snapshot_version = 0
        self.control_ticks = 0
        # The router's view (used only when ``router_refresh_s`` > 0): a snapshot taken at
        # ``_view_at_s`` plus the decisions booked since; rebuilt at the first use from ``_view_due_s``.
        self._refresh_s = config.router_refresh_s
        self._view: ClusterSnapshot | None = None
        # Decisions not yet booked into ``_view``: booked on its next use, dropped if that is a refresh.
        self._unbooked: list[tuple[RequestInfo, RouteDecision]] = []
        self._view_at_s = -math.inf
        self._view_due_s = -math.inf
        self._retry_pending = False  # a router-queue retry is scheduled for the next refresh
        self.router_refreshes = 0

    # ----- snapshot ------------------------------------------------------------------------
    def snapshot(self, now_s: float) -> ClusterSnapshot:
        """The cluster's load now, built from the instances' cached load reports."""
        snap = self._snapshot
        if snap is None:
            self._dirty_log.clear()
            self._snapshot_version += 1
            snap = ClusterSnapshot(at_s=now_s, instances=tuple([inst.load() for inst in self.instances]),
                                   version=self._snapshot_version)
            self._snapshot = snap
            return snap
        log = self._dirty_log
        if not log:
            return snap
        # Every instance that is dirty is in the log (it logs itself on becoming dirty).
        olds = snap.instances
        instances = self.instances
        moves: list[tuple[InstanceLoad, InstanceLoad, int]] = []
        for pos in sorted(set(log)) if len(log) > 1 else log:
            load = instances[pos].load()
            if load is not olds[pos]:
                moves.append((olds[pos], load, pos))
        log.clear()
        if not moves:
            return snap
        # Only a few loads change between arrivals: replace those and carry the policies'
        # memoized orders over (identical to sorting afresh) instead of rebuilding.
        self._snapshot_version += 1
        fresh = snap.with_replaced({pos: new for _, new, pos in moves}, at_s=now_s, version=self._snapshot_version)
        carry_orders(snap, fresh, moves)
        self._snapshot = fresh
        return fresh

    def router_view(self, now_s: float) -> ClusterSnapshot:
        """What the router decides on now: a snapshot at most ``router_refresh_s`` old plus the bookings since."""
        if not self._refresh_s:
            return self.snapshot(now_s)
        unbooked = self._unbooked
        if now_s >= self._view_due_s:
            self._view = self.snapshot(now_s)
            self._view_at_s = now_s
            self._view_due_s = now_s + self._refresh_s
            self.router_refreshes += 1
            unbooked.clear()
        view = self._view
        assert view is not None  # the first call always refreshes (``_view_due_s`` starts at -inf)
        if unbooked:
            for info, where in unbooked:
                view = apply_route(view, info, where)
            unbooked.clear()
            self._view = view
        return view

    def _book(self, info: RequestInfo, where: RouteDecision) -> None:
        """Book a decision into the router's view, as the live router does until its next refresh."""
        # Deferred to the view's next use: a decision followed by a refresh is never booked at all.
        self._unbooked.append((info, where))

    # ----- arrivals, admission, routing ------------------------------------------------------
    def _on_arrival(self, now_s: float, idx: int) -> Events:
        # Latencies count from the trace arrival, not from when the router sees the request.
        req = SimRequest(idx, self._prompt[idx], self._output[idx], self._arrival_s[idx])
        out: list[Scheduled] = []
        if idx + 1 < len(self._seen_s):
            out.append((self._seen_s[idx + 1], EventPriority.ARRIVAL, self._on_arrival, idx + 1))
        if not self.router_queue:
            self._admit(req, now_s, out)
            return out
        # Behind a queue: only a full queue turns it away now; otherwise it waits its turn (FIFO).
        info = req.request_info()
        decision = admit(self.router_view(now_s), info, self.config.admission, len(self.router_queue))
        if decision.outcome is AdmissionOutcome.REJECT:
            assert decision.reason is not None
            self.recorder.reject(idx, decision.reason.value)
        else:
            self.router_queue.append(req)
        return out

    def _admit(self, req: SimRequest, now_s: float, out: list[Scheduled]) -> bool:
        """Admit and route ``req``; False when it must stay queued at the router."""
        info = req.request_info()
        snap = self.router_view(now_s)
        queued = self.router_queue
        depth = len(queued) - 1 if queued and queued[0] is req else len(queued)
        decision = admit(snap, info, self.config.admission, router_queue_depth=depth)
        if decision.outcome is AdmissionOutcome.QUEUE:
            # Nothing is running that could ever make room: waiting would never end. A view
            # older than now may still show load the idle instances have shed: wait for the next.
            if all(inst.is_idle for inst in self.instances) and (not self._refresh_s or self._view_at_s == now_s):
                self.recorder.reject(req.idx, "never_admissible")
                return True
            if not queued or queued[0] is not req:
                queued.append(req)
            if not self._refresh_s:
                for inst in self.instances:
                    inst.notify_steps = True
            elif not self._retry_pending:
                # Between refreshes the view only gains bookings, so no retry could admit earlier.
                self._retry_pending = True
                out.append((self._view_due_s, EventPriority.ARRIVAL, self._on_router_retry, None))
            return False
        if decision.outcome is AdmissionOutcome.REJECT:
            assert decision.reason is not None
            self.recorder.reject(req.idx, decision.reason.value)
            return True
        where = route(snap, info, self.config.routing)
        if isinstance(where, NoRoute):
            self.recorder.reject(req.idx, "no_route")
            return True
        target = self._by_id[where.decode_instance_id]
        total_tokens = req.prompt_tokens + req.output_tokens
        if target.blocks_for(total_tokens) > target.spec.kv_blocks:
            self.recorder.reject(req.idx, "exceeds_kv_capacity")
            return True
        if where.mode is RouteMode.DISAGGREGATED:
            assert where.prefill_instance_id is not None
            prefill = self._by_id[where.prefill_instance_id]
            if prefill.blocks_for(req.prompt_tokens + 1) > prefill.spec.kv_blocks:
                self.recorder.reject(req.idx, "exceeds_kv_capacity")
                return True
            req.decode_to = target
            target = prefill
        if self._refresh_s:
            # Booked only once the request goes to an instance: one turned away never loads any.
            self._book(info, where)
        events = target.enqueue(req, now_s)
        if events:
            out.extend(events)
        return True

    def stepped(self, inst: Instance, now_s: float) -> Events:
        """Retry the router queue now that an instance made progress."""
        out: list[Scheduled] = []
        queue = self.router_queue
        while queue and self._admit(queue[0], now_s, out):
            queue.popleft()
        if not queue:
            for other in self.instances:
                other.notify_steps = False
        return out

    def _on_router_retry(self, now_s: float, _payload: object) -> Events:
        # The view is due for a refresh now (or was refreshed at this instant): retry the queue
        # in order; a request that still must wait schedules the next retry.
        self._retry_pending = False
        out: list[Scheduled] = []
        queue = self.router_queue
        while queue and self._admit(queue[0], now_s, out):
            queue.popleft()
        return out

    # ----- disaggregated hand-off -----------------------------------------------------------
    def prefilled(self, inst: Instance, req: SimRequest, now_s: float) -> Events:
        """P finished a prompt: reserve on D and start the KV flow, or queue for D's blocks."""
        req.prefill_from = inst
        decode: Instance = req.decode_to
        if not decode.pending_in:
            ok, cut = decode.try_reserve(req, now_s)
            if ok:
                more = self.reserved(decode, req, now_s)
                return (cut or []) + (more or [])
        decode.wait_for_blocks(req)
        return None

    def reserved(self, inst: Instance, req: SimRequest, now_s: float) -> Events:
        """D holds blocks for ``req``: move its KV."""
        size = self.config.kv_bytes_per_token * req.prompt_tokens
        if size <= 0:
            return self._transferred(req, now_s)
        src: Instance = req.prefill_from
        return self.network.start(req, size, self._endpoints[src.index], self._endpoints[inst.index], now_s,
                                  self._transferred)

    def _transferred(self, req: SimRequest, now_s: float) -> Events:
        src: Instance = req.prefill_from
        dst: Instance = req.decode_to
        out: list[Scheduled] = []
        for events in (src.release(req, now_s), dst.deliver(req, now_s)):
            if events:
                out.extend(events)
        return out

    # ----- controller ------------------------------------------------------------------------
    def _on_control(self, now_s: float, _payload: object) -> Events:
        self.control_ticks += 1
        for decision in self.control.decide(self.snapshot(now_s), now_s):
            self.apply(decision)
        if self.recorder.ended < len(self.trace):
            assert self.config.control_interval_s is not None
            return [(now_s + self.config.control_interval_s, EventPriority.CONTROL, self._on_control, None)]
        return None

    def apply(self, decision: object) -> None:
        """Carry out one controller decision (a ``ControlDecision``; anything else raises TypeError)."""
        if isinstance(decision, SetHealth):
            inst = self._by_id.get(decision.instance_id)
            if inst is None:
                raise ValueError(f"unknown instance {decision.instance_id!r}")
            inst.set_health(decision.health)
            return
        raise TypeError(f"unsupported controller decision {decision!r}")

    # ----- run ---------------------------------------------------------------------------------
    def run(self) -> Recorder:
        """Replay the whole trace; raises ConservationError if any request was lost."""
        if len(self.trace):
            self.loop.schedule(self._seen_s[0], EventPriority.ARRIVAL, self._on_arrival, 0)
        if self.config.control_interval_s is not None:
            if self.config.control_interval_s <= 0:
                raise ValueError("control_interval_s must be positive")
            self.loop.schedule(0.0, EventPriority.CONTROL, self._on_control, None)
        self.loop.run()
        self.recorder.check_conservation()
        busy = [inst.spec.instance_id for inst in self.instances if not inst.is_idle]
        if busy or self.router_queue:
            raise RuntimeError(f"run ended with work left on {busy} / router queue {len(self.router_queue)}")
        return self.recorder
