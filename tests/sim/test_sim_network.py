"""KV transfers as flows sharing links at max-min fair rates."""

from __future__ import annotations

import random
from collections import defaultdict

import pytest

from simulations.sim.events import EventLoop
from simulations.sim.network import Endpoint, LinkConfig, Network

CONFIG = LinkConfig(intra_node_gbps=100.0, inter_node_gbps=10.0)
GB = 1e9
P0 = Endpoint("n0", "p0")
P1 = Endpoint("n0", "p1")
P2 = Endpoint("n0", "p2")
D0 = Endpoint("n1", "d0")
D1 = Endpoint("n1", "d1")

Start = tuple[float, float, Endpoint, Endpoint]  # at_s, bytes, src, dst


class _Run:
    """Flows started on an event loop; completion times and every rate change recorded."""

    def __init__(self, starts: list[Start], config: LinkConfig = CONFIG) -> None:
        self.net = Network(config)
        self.done: dict[int, float] = {}
        self.history: list[tuple[float, dict[int, float]]] = []  # (at_s, rates after the change)
        loop = EventLoop()
        for flow_id, (at_s, size, src, dst) in enumerate(starts):
            loop.schedule(at_s, 0, self._start, (flow_id, size, src, dst))
        loop.run()
        assert not self.net.flows and self.net.flows_done == len(starts)
        assert self.net.bytes_moved == pytest.approx(sum(s[1] for s in starts))

    def _finished(self, flow_id: int, now_s: float) -> None:
        self.done[flow_id] = now_s
        self.history.append((now_s, self.net.rates_bps()))

    def _start(self, now_s: float, payload: tuple[int, float, Endpoint, Endpoint]):  # type: ignore[no-untyped-def]
        fid, nbytes, src, dst = payload
        events = self.net.start(fid, nbytes, src, dst, now_s, self._finished)
        self.history.append((now_s, self.net.rates_bps()))
        return events

    def delivered_bytes(self) -> dict[int, float]:
        """Bytes each flow moved: its rates integrated over time, piecewise constant between changes."""
        moved: dict[int, float] = defaultdict(float)
        for (at_s, rates), (next_s, _) in zip(self.history, self.history[1:], strict=False):
            for fid, rate in rates.items():
                moved[fid] += rate * (next_s - at_s)
        return dict(moved)


def test_two_concurrent_flows_on_one_link_take_twice_as_long() -> None:
    alone = _Run([(0.0, GB, P0, D0)]).done
    shared = _Run([(0.0, GB, P0, D0), (0.0, GB, P0, D1)]).done  # share p0's NIC out
    assert alone[0] == pytest.approx(0.1)
    assert shared[0] == pytest.approx(0.2) and shared[1] == pytest.approx(0.2)
    disjoint = _Run([(0.0, GB, P0, D0), (0.0, GB, P1, D1)]).done  # different NICs: no sharing
    assert disjoint[0] == pytest.approx(0.1) and disjoint[1] == pytest.approx(0.1)


def test_rates_are_recomputed_when_flows_start_and_finish() -> None:
    # Flow 0 alone for 0.05 s (half its bytes), then shares d0's NIC in with flow 1 until it ends.
    done = _Run([(0.0, GB, P0, D0), (0.05, GB, P1, D0)]).done
    assert done[0] == pytest.approx(0.15)  # 0.5 GB left at 5 GB/s
    assert done[1] == pytest.approx(0.20)  # 0.5 GB shared, then 0.5 GB alone at 10 GB/s


def test_a_flow_bottlenecked_elsewhere_leaves_its_share_to_the_others() -> None:
    # A p0->d0, C p1->d0, D p2->d0 share d0's NIC in (10 GB/s): 10/3 each. B p0->d1 shares p0's
    # NIC out with A only. Equal split would give B 10/2 = 5 GB/s; max-min gives it what A
    # cannot use: 10 - 10/3 = 6.67 GB/s.
    run = _Run([(0.0, GB, P0, D0), (0.0, 3 * GB, P0, D1), (0.0, GB, P1, D0), (0.0, GB, P2, D0)])
    first = run.history[3][1]  # rates once all four flows run (before any finishes)
    assert sorted(first) == [0, 1, 2, 3]
    assert first[0] == pytest.approx(10 * GB / 3) and first[2] == first[3] == first[0]
    assert first[1] == pytest.approx(20 * GB / 3)
    # A, C, D: 1 GB at 10/3 GB/s -> 0.3 s; B has moved 2 GB by then, the last 1 GB alone at 10 GB/s.
    assert run.done[0] == run.done[2] == run.done[3] == pytest.approx(0.3)
    assert run.done[1] == pytest.approx(0.4)  # equal split: 1.5 GB by 0.3 s, so 0.45 s


def test_progressive_filling_takes_several_rounds_and_fills_a_wide_link() -> None:
    # d0 has 2 GPUs (20 GB/s in). Flows: A p0->d0, B p1->d0, C p1->d1, D p2->d1, E p2->d0.
    # Round 1: d1 in (C, D) and p1 out, p2 out all offer 5 GB/s: C, D, B, E fixed at 5.
    # Round 2: d0 in has 20 - 5 - 5 = 10 left for A alone, p0 out offers 10: A = 10, so d0's
    # 20 GB/s is full. Equal split would cap A at 20/3 GB/s.
    wide = Endpoint("n1", "d0", gpus=2)
    sizes = [GB, GB, GB, GB, GB]
    run = _Run([(0.0, sizes[0], P0, wide), (0.0, sizes[1], P1, wide), (0.0, sizes[2], P1, D1),
                (0.0, sizes[3], P2, D1), (0.0, sizes[4], P2, wide)])
    rates = run.history[4][1]
    assert rates[0] == pytest.approx(10 * GB)
    for fid in (1, 2, 3, 4):
        assert rates[fid] == pytest.approx(5 * GB)
    # A ends at 0.1 s; the rest keep 5 GB/s (their out links are still shared): 1 GB -> 0.2 s.
    assert run.done[0] == pytest.approx(0.1)
    for fid in (1, 2, 3, 4):
        assert run.done[fid] == pytest.approx(0.2)
    assert run.delivered_bytes() == pytest.approx(dict(enumerate(sizes)))


def _check_max_min(net: Network, flows: dict[int, tuple[str, str]]) -> None:
    """No link over capacity, and every flow has a bottleneck: a full link where no flow is faster."""
    rates = net.rates_bps()
    load: dict[str, float] = defaultdict(float)
    fastest: dict[str, float] = defaultdict(float)
    for fid, rate in rates.items():
        assert rate > 0
        for link in flows[fid]:
            load[link] += rate
            fastest[link] = max(fastest[link], rate)
    capacity = net._capacity_bps  # the registered link capacities
    for link, used in load.items():
        assert used <= capacity[link] * (1 + 1e-9), f"{link} over capacity"
    for fid, rate in rates.items():
        assert any(
            load[link] >= capacity[link] * (1 - 1e-9) and rate >= fastest[link] * (1 - 1e-9)
            for link in flows[fid]
        ), f"flow {fid} at {rate / GB:.3f} GB/s has no bottleneck link"


@pytest.mark.parametrize("seed", range(20))
def test_random_flows_are_max_min_fair_and_conserve_bytes(seed: int) -> None:
    rng = random.Random(seed)
    ends = [Endpoint(f"n{rng.randrange(3)}", f"i{k}", gpus=rng.choice((1, 2, 4))) for k in range(6)]
    starts: list[Start] = []
    for _ in range(rng.randrange(2, 14)):
        src, dst = rng.sample(ends, 2)
        starts.append((rng.choice((0.0, 0.0, rng.uniform(0, 0.2))), rng.uniform(0.1, 3.0) * GB, src, dst))
    probe = Network(CONFIG)  # registers each path's link capacities
    paths = {fid: probe.path(src, dst) for fid, (_, _, src, dst) in enumerate(starts)}
    checks = 0

    class Checked(_Run):
        def _start(self, now_s, payload):  # type: ignore[no-untyped-def]
            nonlocal checks
            events = super()._start(now_s, payload)
            _check_max_min(self.net, paths)
            checks += 1
            return events

        def _finished(self, flow_id: int, now_s: float) -> None:
            nonlocal checks
            super()._finished(flow_id, now_s)
            if self.net.flows:
                _check_max_min(self.net, paths)
                checks += 1

    run = Checked(starts)
    assert checks >= len(starts)
    assert run.delivered_bytes() == pytest.approx({fid: s[1] for fid, s in enumerate(starts)}, rel=1e-6)
    for fid, (at_s, size, _, _) in enumerate(starts):
        alone_bps = min(probe._capacity_bps[link] for link in paths[fid])
        assert run.done[fid] >= at_s + size / alone_bps * (1 - 1e-9)  # never faster than alone on its path


def test_same_node_flows_use_nvlink_and_tp_groups_have_more_bandwidth() -> None:
    done = _Run([(0.0, GB, P0, P1), (0.0, GB, Endpoint("n0", "big", gpus=4), Endpoint("n2", "d", gpus=4))]).done
    assert done[0] == pytest.approx(0.01)
    assert done[1] == pytest.approx(0.025)  # 4 NICs each side


def test_transfer_latency_delays_the_hand_off_but_holds_no_bandwidth() -> None:
    config = LinkConfig(intra_node_gbps=100.0, inter_node_gbps=10.0, transfer_latency_s=0.03)
    # Flow 0's last byte leaves p0's NIC at 0.1 s; it is handed over at 0.13 s. Flow 1 starts on
    # the same NIC at 0.11 s and runs alone at the full 10 GB/s: 1 GB by 0.21 s, handed over at 0.24 s.
    run = _Run([(0.0, GB, P0, D0), (0.11, GB, P0, D1)], config)
    assert run.history[1] == (0.11, {1: 10 * GB})
    assert run.done[0] == pytest.approx(0.13)
    assert run.done[1] == pytest.approx(0.24)


def test_bad_link_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="positive"):
        LinkConfig(inter_node_gbps=0.0)
    with pytest.raises(ValueError, match="transfer_latency_s"):
        LinkConfig(transfer_latency_s=-0.1)
    with pytest.raises(ValueError, match="transfer_latency_s"):
        LinkConfig(transfer_latency_s=float("nan"))


def test_negative_transfer_size_is_rejected() -> None:
    with pytest.raises(ValueError, match="negative"):
        Network(CONFIG).start(0, -1.0, P0, D0, 0.0, lambda _p, _t: None)
