"""Runs a set of simulations covering every event kind and prints the mode and one digest per run.

Run in a fresh process (``python tests/sim/native_probe.py``) so ``PDSERVE_SIM_PURE`` decides
whether ``simulations.sim`` loads its compiled or its Python modules; test_sim_native.py
compares the two outputs.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sim_models import AffineModel  # noqa: E402
from sim_scenarios import FlappingHealth, random_trace  # noqa: E402

import simulations.sim  # noqa: E402
from orchestrator.core.slo import SLOTarget  # noqa: E402
from simulations.experiments.specs import ClusterKnobs, Placement, build_cluster, load_latency  # noqa: E402
from simulations.latency.base import LatencyModel  # noqa: E402
from simulations.sim.cluster import (  # noqa: E402
    ClusterConfig,
    ClusterSim,
    colocated,
    disaggregated,
)
from simulations.sim.instance import BatchPolicy  # noqa: E402
from simulations.sim.network import LinkConfig  # noqa: E402
from simulations.sim.results import collect  # noqa: E402
from simulations.traces.trace import Trace  # noqa: E402

_trace = functools.partial(random_trace, max_output=500)


def _digest(sim: ClusterSim) -> str:
    sim.run()
    result = collect(sim, SLOTarget(1.0, 0.05))
    h = hashlib.sha256()
    for part in (result.to_json().encode(), result.ttft_s.tobytes(), result.e2e_s.tobytes(),
                 result.preemptions.tobytes(), np.asarray(result.gaps.counts).tobytes(),
                 repr([(i.busy_s, i.prefill_tokens_done, i.decode_tokens_done, i.preemptions, i.timeline.busy_s)
                       for i in sim.instances]).encode(),
                 repr((sim.network.bytes_moved, sim.network.flows_done, sim.control_ticks)).encode()):
        h.update(part)
    return h.hexdigest()


def runs(router_refresh_s: float | None = None) -> dict[str, str]:
    """Digest of every probe run, by name; ``router_refresh_s`` overrides every case's."""
    roofline = load_latency("roofline:a100-80gb:llama-2-13b")
    real = build_cluster(Placement(prefill=2, decode=2), roofline, ClusterKnobs())
    cases: dict[str, tuple[Trace, LatencyModel, ClusterConfig, object]] = {
        "disagg-preempting": (_trace(1500, 15.0, 1), AffineModel(),
                              disaggregated(2, 2, decode_kv_blocks=1200, kv_bytes_per_token=8e5), None),
        "disagg-shared-links": (_trace(800, 30.0, 2), AffineModel(closed_form=False),
                                disaggregated(3, 1, decode_kv_blocks=3000, kv_bytes_per_token=2e6,
                                              links=LinkConfig(transfer_latency_s=0.002), request_overhead_s=0.01),
                                None),
        "disagg-control": (_trace(900, 12.0, 3), AffineModel(),
                           disaggregated(3, 2, decode_kv_blocks=1500, control_interval_s=0.7), FlappingHealth("d1")),
        "colocated-chunked": (_trace(900, 10.0, 4), AffineModel(),
                              colocated(2, kv_blocks=700, policy=BatchPolicy.CHUNKED), None),
        "colocated-steps": (_trace(600, 8.0, 5), AffineModel(),
                            dataclasses.replace(colocated(2, kv_blocks=600), jump_decode_steps=False), None),
        "router-queue": (_trace(1200, 200.0, 6, max_prompt=8000), AffineModel(), colocated(1, kv_blocks=800), None),
        "roofline": (_trace(3000, 25.0, 7), roofline.model, real, None),
        # The router with perfect information (the cases above see a view refreshed every 0.2 s).
        "router-queue-perfect": (_trace(1200, 200.0, 6, max_prompt=8000), AffineModel(),
                                 colocated(1, kv_blocks=800, router_refresh_s=0.0), None),
        "disagg-control-perfect": (_trace(900, 12.0, 3), AffineModel(),
                                   disaggregated(3, 2, decode_kv_blocks=1500, control_interval_s=0.7,
                                                 router_refresh_s=0.0), FlappingHealth("d1")),
    }
    out = {}
    for name, (trace, model, config, control) in cases.items():
        if router_refresh_s is not None:
            config = dataclasses.replace(config, router_refresh_s=router_refresh_s)
        out[name] = _digest(ClusterSim(trace, model, config, control))  # type: ignore[arg-type]
    return out


if __name__ == "__main__":
    print(f"mode {simulations.sim.MODE}")
    # Optional argument: one router refresh interval for every case.
    for name, digest in runs(float(sys.argv[1]) if len(sys.argv) > 1 else None).items():
        print(name, digest)
