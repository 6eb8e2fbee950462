"""KV transfers as flows over shared links, at max-min fair rates.

Every GPU has an intra-node port (NVLink) and a NIC (as in DGX-class nodes,
one NIC per GPU), each with separate out and in directions; an instance of
``gpus`` GPUs has ``gpus`` times the bandwidth. A flow between instances on
one node uses the source's NVLink out and the destination's NVLink in; across
nodes, the source NIC's out and the destination NIC's in.

Links are shared max-min fairly (progressive filling; an idealisation of
what per-flow congestion control settles at): the link with the smallest fair share (capacity left
/ flows not yet fixed) is the bottleneck of its flows, which are fixed at
that share; their bandwidth is taken off the other link they cross, and the
next most constrained link is found, until every flow has a rate. A flow
held back elsewhere leaves its unused share of a link to the flows that can
use it, so no link that could carry more for some flow sits idle.

A flow's life: ``start`` registers it and recomputes every rate; bytes drain
at those rates; one pending event marks the earliest completion (stale ones
are ignored by epoch); at a completion the finished flows leave, the rates
are recomputed, and each finished flow's ``on_done`` runs, at once or
``LinkConfig.transfer_latency_s`` later (a fixed hand-off latency that holds
no bandwidth). Rates change only when a flow starts or ends, so completion
times are exact.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from simulations.sim.events import EventPriority, Scheduled

OnDone = Callable[[Any, float], "list[Scheduled] | None"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where KV leaves or lands: an instance (``name``) of ``gpus`` GPUs on ``node_id``."""

    node_id: str
    name: str
    gpus: int = 1


@dataclass(frozen=True, slots=True)
class LinkConfig:
    """Per-GPU bandwidths of the links KV moves over (GB/s = 1e9 bytes per second, each direction)."""

    intra_node_gbps: float = 300.0  # NVLink port of one GPU (A100 class)
    inter_node_gbps: float = 25.0  # one 200 Gb/s NIC per GPU
    # Fixed seconds from a transfer's last byte to its hand-off completing (the control calls
    # around it, the receiver taking the request up); it holds no link bandwidth.
    transfer_latency_s: float = 0.0

    def __post_init__(self) -> None:
        if self.intra_node_gbps <= 0 or self.inter_node_gbps <= 0:
            raise ValueError("link bandwidths must be positive")
        if not 0.0 <= self.transfer_latency_s < float("inf"):  # also rejects NaN
            raise ValueError(f"transfer_latency_s must be finite and >= 0, got {self.transfer_latency_s}")


class _Flow:
    __slots__ = ("payload", "remaining_bytes", "links", "rate_bps", "on_done")

    def __init__(self, payload: Any, size_bytes: float, links: tuple[str, str], on_done: OnDone) -> None:
        self.payload = payload
        self.remaining_bytes = size_bytes
        self.links = links
        self.rate_bps = 0.0
        self.on_done = on_done


class Network:
    """Active flows and the links they share."""

    __slots__ = ("config", "flows", "_last_s", "_epoch", "bytes_moved", "flows_done", "_on_tick", "_capacity_bps",
                 "_on_link")

    def __init__(self, config: LinkConfig) -> None:
        self.config = config
        self.flows: list[_Flow] = []
        self._capacity_bps: dict[str, float] = {}
        self._on_link: dict[str, list[_Flow]] = {}  # link -> active flows on it (kept as flows start and end)
        self._last_s = 0.0
        self._epoch = 0
        self.bytes_moved = 0.0
        self.flows_done = 0
        self._on_tick = self._on_next_done

    def path(self, src: Endpoint, dst: Endpoint) -> tuple[str, str]:
        """Links a flow from ``src`` to ``dst`` crosses (registering their capacities)."""
        if src.node_id == dst.node_id:
            links = (f"nvlink-out:{src.name}", f"nvlink-in:{dst.name}")
            gbps = self.config.intra_node_gbps
        else:
            links = (f"nic-out:{src.name}", f"nic-in:{dst.name}")
            gbps = self.config.inter_node_gbps
        self._capacity_bps[links[0]] = gbps * 1e9 * src.gpus
        self._capacity_bps[links[1]] = gbps * 1e9 * dst.gpus
        return links

    def rates_bps(self) -> dict[Any, float]:
        """Each active flow's current rate in bytes/s, by payload."""
        return {f.payload: f.rate_bps for f in self.flows}

    def _advance(self, now_s: float) -> None:
        elapsed = now_s - self._last_s
        if elapsed > 0:
            for flow in self.flows:
                flow.remaining_bytes -= flow.rate_bps * elapsed
        self._last_s = now_s

    def _fill(self) -> None:
        """Set every flow's max-min fair rate by progressive filling (see the module docstring)."""
        capacity = self._capacity_bps
        on_link = self._on_link
        # A flow alone on both its links gets its slower link's capacity: filling would pop one of
        # its two links (share = capacity / 1) and touch no other link, so settle it here.
        todo = 0
        for flow in self.flows:
            out_link, in_link = flow.links
            if len(on_link[out_link]) == 1 and len(on_link[in_link]) == 1:
                out_bps = capacity[out_link]
                in_bps = capacity[in_link]
                flow.rate_bps = in_bps if in_bps < out_bps else out_bps
            else:
                flow.rate_bps = -1.0
                todo += 1
        left_bps: dict[str, float] = {}
        unfixed: dict[str, int] = {}
        heap: list[tuple[float, str]] = []
        for link, users in on_link.items():
            n = len(users)
            if n == 1 and users[0].rate_bps >= 0.0:
                continue  # the link of a flow settled above
            left_bps[link] = capacity[link]
            unfixed[link] = n
            heap.append((capacity[link] / n, link))
        heapq.heapify(heap)
        pop = heapq.heappop
        push = heapq.heappush
        while todo:
            share_bps, link = pop(heap)
            n = unfixed[link]
            # Lazy deletion: each change of a link's share pushed a fresh entry, so an entry
            # that no longer equals the share (or whose link is settled) is stale.
            if n == 0 or left_bps[link] / n != share_bps:
                continue
            unfixed[link] = 0
            for flow in on_link[link]:
                if flow.rate_bps >= 0.0:
                    continue
                flow.rate_bps = share_bps
                todo -= 1
                out_link, in_link = flow.links
                other = in_link if out_link == link else out_link
                rest = unfixed[other] - 1
                unfixed[other] = rest
                if rest:
                    left = left_bps[other] - share_bps
                    left_bps[other] = left
                    push(heap, (left / rest, other))

    def _reschedule(self, now_s: float) -> list[Scheduled]:
        self._epoch += 1
        flows = self.flows
        if not flows:
            return []
        if len(self._on_link) == 2 * len(flows):  # no link is shared: each flow at its slower link
            capacity = self._capacity_bps
            for flow in flows:
                out_bps = capacity[flow.links[0]]
                in_bps = capacity[flow.links[1]]
                flow.rate_bps = in_bps if in_bps < out_bps else out_bps
        else:
            self._fill()
        next_s = float("inf")
        for flow in flows:
            left = flow.remaining_bytes
            done_s = now_s + (left if left > 0.0 else 0.0) / flow.rate_bps
            if done_s < next_s:
                next_s = done_s
        return [(next_s, EventPriority.TRANSFER, self._on_tick, self._epoch)]

    def start(self, payload: Any, size_bytes: float, src: Endpoint, dst: Endpoint, now_s: float,
              on_done: OnDone) -> list[Scheduled]:
        """Start moving ``size_bytes``; ``on_done(payload, now_s)`` runs when the last byte lands."""
        if size_bytes < 0:
            raise ValueError(f"negative transfer size {size_bytes}")
        self._advance(now_s)
        flow = _Flow(payload, float(size_bytes), self.path(src, dst), on_done)
        self.flows.append(flow)
        on_link = self._on_link
        for link in flow.links:
            users = on_link.get(link)
            if users is None:
                on_link[link] = [flow]
            else:
                users.append(flow)
        self.bytes_moved += size_bytes
        return self._reschedule(now_s)

    def _on_next_done(self, now_s: float, epoch: int) -> list[Scheduled] | None:
        if epoch != self._epoch:
            return None
        self._advance(now_s)
        # A flow is done when what is left would take under a nanosecond (float residue).
        done: list[_Flow] = []
        active: list[_Flow] = []
        for f in self.flows:
            (active if f.remaining_bytes > f.rate_bps * 1e-9 else done).append(f)
        self.flows = active
        on_link = self._on_link
        for f in done:
            for link in f.links:
                users = on_link[link]
                if len(users) == 1:
                    del on_link[link]
                else:
                    users.remove(f)
        out = self._reschedule(now_s)
        latency_s = self.config.transfer_latency_s
        for flow in done:
            if latency_s > 0.0:
                out.append((now_s + latency_s, EventPriority.TRANSFER, self._deliver, flow))
                continue
            self.flows_done += 1
            more = flow.on_done(flow.payload, now_s)
            if more:
                out.extend(more)
        return out

    def _deliver(self, now_s: float, flow: _Flow) -> list[Scheduled] | None:
        """Hand a finished flow over, ``transfer_latency_s`` after its last byte."""
        self.flows_done += 1
        return flow.on_done(flow.payload, now_s)
