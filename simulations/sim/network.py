"""KV transfers as flows over shared links.

Every GPU has an intra-node port (NVLink) and a NIC (as in DGX-class nodes,
one NIC per GPU), each with separate out and in directions; an instance of
``gpus`` GPUs has ``gpus`` times the bandwidth. A flow between instances on
one node uses the source's NVLink out and the destination's NVLink in; across
nodes, the source NIC's out and the destination NIC's in. Flows sharing a
link split it equally; a flow moves at the smallest share along its path.
Rates are recomputed whenever a flow starts or ends, and one pending event
marks the next completion (stale ones are ignored by epoch).
"""

from __future__ import annotations

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

    def __post_init__(self) -> None:
        if self.intra_node_gbps <= 0 or self.inter_node_gbps <= 0:
            raise ValueError("link bandwidths must be positive")


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
                 "_users")

    def __init__(self, config: LinkConfig) -> None:
        self.config = config
        self.flows: list[_Flow] = []
        self._capacity_bps: dict[str, float] = {}
        self._users: dict[str, int] = {}  # link -> active flows on it (kept as flows start and end)
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

    def _advance(self, now_s: float) -> None:
        elapsed = now_s - self._last_s
        if elapsed > 0:
            for flow in self.flows:
                flow.remaining_bytes -= flow.rate_bps * elapsed
        self._last_s = now_s

    def _reschedule(self, now_s: float) -> list[Scheduled]:
        users = self._users
        next_s = float("inf")
        capacity = self._capacity_bps
        # min()/max() written as comparisons (same values, ties and all; no NaNs here): the hot loop.
        for flow in self.flows:
            out_link, in_link = flow.links
            out_bps = capacity[out_link] / users[out_link]
            in_bps = capacity[in_link] / users[in_link]
            rate_bps = in_bps if in_bps < out_bps else out_bps
            flow.rate_bps = rate_bps
            left = flow.remaining_bytes
            done_s = now_s + (left if left > 0.0 else 0.0) / rate_bps
            if done_s < next_s:
                next_s = done_s
        self._epoch += 1
        if not self.flows:
            return []
        return [(next_s, EventPriority.TRANSFER, self._on_tick, self._epoch)]

    def start(self, payload: Any, size_bytes: float, src: Endpoint, dst: Endpoint, now_s: float,
              on_done: OnDone) -> list[Scheduled]:
        """Start moving ``size_bytes``; ``on_done(payload, now_s)`` runs when the last byte lands."""
        if size_bytes < 0:
            raise ValueError(f"negative transfer size {size_bytes}")
        self._advance(now_s)
        links = self.path(src, dst)
        self.flows.append(_Flow(payload, float(size_bytes), links, on_done))
        users = self._users
        for link in links:
            users[link] = users.get(link, 0) + 1
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
        users = self._users
        for f in done:
            for link in f.links:
                left = users[link] - 1
                if left:
                    users[link] = left
                else:
                    del users[link]
        out = self._reschedule(now_s)
        for flow in done:
            self.flows_done += 1
            more = flow.on_done(flow.payload, now_s)
            if more:
                out.extend(more)
        return out
