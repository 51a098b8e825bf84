"""PNG plots of benchmark results (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after the backend is chosen


def ttft_cdf(ttfts: Mapping[str, Sequence[float]], path: Path, title: str) -> Path:
    """One CDF curve of time to first token per policy."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for name, values in ttfts.items():
        xs = sorted(values)
        if not xs:
            continue
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.step([x * 1e3 for x in xs], ys, where="post", label=name)
    ax.set_xlabel("time to first token (ms)")
    ax.set_ylabel("fraction of returning turns")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def ttft_vs_bandwidth(
    series: Mapping[str, Sequence[tuple[float, float]]], path: Path, title: str
) -> Path:
    """Mean TTFT of returning turns against emulated L3 bandwidth, one line per policy."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for name, points in series.items():
        pts = sorted(points)
        ax.plot([p[0] for p in pts], [p[1] * 1e3 for p in pts], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("emulated L3 bandwidth (Gbit/s)")
    ax.set_ylabel("mean TTFT of returning turns (ms)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def ttft_bars(means: Mapping[str, float], path: Path, title: str) -> Path:
    """Mean TTFT of returning turns per policy."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    names = list(means)
    bars = ax.bar(names, [means[n] * 1e3 for n in names], color="#4C72B0")
    ax.bar_label(bars, fmt="%.0f ms")
    ax.set_ylabel("mean TTFT of returning turns (ms)")
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
