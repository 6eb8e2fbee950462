"""KV transfers as flows sharing links."""

from __future__ import annotations

import pytest

from simulations.sim.events import EventLoop
from simulations.sim.network import Endpoint, LinkConfig, Network

CONFIG = LinkConfig(intra_node_gbps=100.0, inter_node_gbps=10.0)
P0 = Endpoint("n0", "p0")
P1 = Endpoint("n0", "p1")
D0 = Endpoint("n1", "d0")
D1 = Endpoint("n1", "d1")


def _run_flows(starts: list[tuple[float, float, Endpoint, Endpoint]], config: LinkConfig = CONFIG) -> dict[int, float]:
    """Start flows (at_s, bytes, src, dst); return each flow's completion time."""
    loop = EventLoop()
    net = Network(config)
    done: dict[int, float] = {}

    def finished(flow_id: int, now_s: float) -> None:
        done[flow_id] = now_s

    def start(now_s: float, payload: tuple[int, float, Endpoint, Endpoint]):  # type: ignore[no-untyped-def]
        fid, nbytes, src, dst = payload
        return net.start(fid, nbytes, src, dst, now_s, finished)

    for flow_id, (at_s, size, src, dst) in enumerate(starts):
        loop.schedule(at_s, 0, start, (flow_id, size, src, dst))
    loop.run()
    assert not net.flows and net.flows_done == len(starts)
    return done


def test_two_concurrent_flows_on_one_link_take_twice_as_long() -> None:
    alone = _run_flows([(0.0, 1e9, P0, D0)])
    shared = _run_flows([(0.0, 1e9, P0, D0), (0.0, 1e9, P0, D1)])  # share p0's NIC out
    assert alone[0] == pytest.approx(0.1)
    assert shared[0] == pytest.approx(0.2) and shared[1] == pytest.approx(0.2)
    disjoint = _run_flows([(0.0, 1e9, P0, D0), (0.0, 1e9, P1, D1)])  # different NICs: no sharing
    assert disjoint[0] == pytest.approx(0.1) and disjoint[1] == pytest.approx(0.1)


def test_rates_are_recomputed_when_flows_start_and_finish() -> None:
    # Flow 0 alone for 0.05 s (half its bytes), then shares d0's NIC in with flow 1 until it ends.
    done = _run_flows([(0.0, 1e9, P0, D0), (0.05, 1e9, P1, D0)])
    assert done[0] == pytest.approx(0.15)  # 0.5 GB left at 5 GB/s
    assert done[1] == pytest.approx(0.20)  # 0.5 GB shared, then 0.5 GB alone at 10 GB/s


def test_same_node_flows_use_nvlink_and_tp_groups_have_more_bandwidth() -> None:
    done = _run_flows([(0.0, 1e9, P0, P1), (0.0, 1e9, Endpoint("n0", "big", gpus=4), Endpoint("n2", "d", gpus=4))])
    assert done[0] == pytest.approx(0.01)
    assert done[1] == pytest.approx(0.025)  # 4 NICs each side


def test_bad_link_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="positive"):
        LinkConfig(inter_node_gbps=0.0)
