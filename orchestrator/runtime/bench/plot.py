"""CDF plots of a benchmark's TTFT, TPOT and e2e latencies (matplotlib, Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from orchestrator.runtime.bench.report import latency_of
from orchestrator.runtime.bench.runner import RequestResult


def plot_cdfs(
    results: Sequence[RequestResult], path: str | Path, ttft_slo_s: float | None = None,
    tpot_slo_s: float | None = None, title: str = "",
) -> Path:
    """Write a PNG with one CDF panel per latency (SLO targets as dashed lines) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latencies = [lat for lat in (latency_of(r) for r in results) if lat is not None]
    series = {
        "TTFT": ([lat.ttft_s for lat in latencies], ttft_slo_s),
        "TPOT": ([lat.tpot_s for lat in latencies if lat.output_tokens > 1], tpot_slo_s),
        "e2e": ([lat.e2e_s for lat in latencies], None),
    }
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (name, (values, slo_s)) in zip(axes, series.items(), strict=True):
        ordered = sorted(v * 1e3 for v in values)
        if ordered:
            fractions = [(i + 1) / len(ordered) for i in range(len(ordered))]
            ax.step(ordered, fractions, where="post")
        else:
            ax.text(0.5, 0.5, "no successful requests", ha="center", va="center", transform=ax.transAxes)
        if slo_s is not None:
            ax.axvline(slo_s * 1e3, linestyle="--", color="tab:red", label=f"SLO {slo_s * 1e3:g} ms")
            ax.legend(loc="lower right")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
