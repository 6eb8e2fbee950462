"""PNG plots of simulation results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from orchestrator.core.slo import SLOTarget
from simulations.sim.recorder import RequestStatus

if TYPE_CHECKING:
    from simulations.experiments.goodput import PlacementGoodput
    from simulations.sim.results import RunResult


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_latency_cdfs(results: Mapping[str, RunResult], path: str, slo: SLOTarget | None = None) -> None:
    """TTFT and TPOT CDFs of finished requests, one line per run, SLO targets dashed."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, res in results.items():
        done = res.status == RequestStatus.FINISHED
        for ax, values in ((axes[0], res.ttft_s[done]), (axes[1], res.tpot_s[done])):
            if len(values) == 0:
                continue
            xs = np.sort(values)
            ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=label)
    for ax, name, target in ((axes[0], "TTFT (s)", slo.ttft_s if slo else None),
                             (axes[1], "TPOT (s)", slo.tpot_s if slo else None)):
        ax.set_xlabel(name)
        ax.set_ylabel("fraction of requests")
        ax.set_xscale("log")
        ax.grid(True, which="both", alpha=0.3)
        if target is not None:
            ax.axvline(target, color="k", linestyle="--", linewidth=1, label=f"SLO {target:g} s")
        ax.legend(fontsize=8)
    fig.suptitle("Latency CDFs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_utilisation(result: RunResult, path: str) -> None:
    """Busy fraction of every instance over time (heat map, one row per instance)."""
    plt = _pyplot()
    ids = list(result.utilisation)
    grid = np.vstack([result.utilisation[i] for i in ids]) if ids else np.zeros((1, 1))
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(ids) + 1.6))
    end_s = grid.shape[1] * result.timeline_bucket_s
    im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1,
                   extent=(0, end_s, len(ids) - 0.5, -0.5))
    ax.set_yticks(range(len(ids)))
    ax.set_yticklabels(ids)
    ax.set_xlabel("simulated time (s)")
    ax.set_title(f"Instance utilisation over time — {result.label}")
    fig.colorbar(im, ax=ax, label="busy fraction")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_attainment_vs_rate(goodputs: Sequence[PlacementGoodput], path: str, target: float) -> None:
    """SLO attainment against per-GPU rate for each placement; the target dashed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    for g in goodputs:
        pts = sorted(g.search.points, key=lambda p: p.rate_rps)
        xs = [p.rate_rps / g.placement.num_gpus for p in pts]
        ys = [p.attainment for p in pts]
        style = "-o" if g.placement.is_colocated else "-s"
        ax.plot(xs, ys, style, markersize=3, label=f"{g.placement.label}: {g.per_gpu_rps:.2f} rps/GPU")
    ax.axhline(target, color="k", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("request rate per GPU (req/s)")
    ax.set_ylabel("SLO attainment")
    ax.set_ylim(0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title("SLO attainment vs rate")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_goodput_bars(goodputs: Sequence[PlacementGoodput], path: str) -> None:
    """Per-GPU goodput of every placement, colocated in orange, disaggregated in blue."""
    plt = _pyplot()
    ordered = sorted(goodputs, key=lambda g: g.per_gpu_rps, reverse=True)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(ordered) + 2), 4.5))
    colours = ["tab:orange" if g.placement.is_colocated else "tab:blue" for g in ordered]
    ax.bar(range(len(ordered)), [g.per_gpu_rps for g in ordered], color=colours)
    ax.set_xticks(range(len(ordered)))
    ax.set_xticklabels([g.placement.label for g in ordered], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("goodput per GPU (req/s)")
    ax.set_title("Per-GPU goodput (orange: colocated, blue: disaggregated)")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
