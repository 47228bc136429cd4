"""Figures of the LLM probe: CD per layer for each shot count, CD vs accuracy, patching effect."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # headless
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from lcd.icl_eval import linear_fit  # noqa: E402

__all__ = ["plot_cd_per_layer", "plot_cd_vs_accuracy", "plot_patching"]


def plot_cd_per_layer(results: dict[int, dict], chance: float) -> Figure:
    """One line of CD against layer (0-based) per shot count; chance dashed; best layers marked."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for shots, res in sorted(results.items()):
        (line,) = ax.plot(res["layers"], res["cd"].tolist(), marker="o", ms=3, label=f"{shots}-shot")
        best = res["layers"].index(res["best_layer"])
        ax.plot(res["best_layer"], res["cd"][best].item(), "*", ms=12, color=line.get_color())
    ax.axhline(chance, ls="--", color="grey", label="chance")
    ax.set(xlabel="layer (0-based)", ylabel="CD (leave-one-out 10-NN accuracy)", ylim=(0, 1.02))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Concept decodability at the token before the answer")
    ax.legend(fontsize=8)
    return fig


def plot_cd_vs_accuracy(results: dict[int, dict]) -> Figure:
    """Per-concept CD (at each shot count's best layer) vs exact-match accuracy, with the pooled fit."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    markers = "osD^v<>p"
    concepts = [n for n, r in next(iter(results.values()))["concepts"].items() if r["acc"] is not None]
    colors = {n: plt.cm.tab10(i % 10) for i, n in enumerate(concepts)}
    xs, ys = [], []
    for j, (_, res) in enumerate(sorted(results.items())):
        for name in concepts:
            r = res["concepts"][name]
            ax.scatter(r["cd"], r["acc"], color=colors[name], marker=markers[j % len(markers)], s=40)
            xs.append(r["cd"])
            ys.append(r["acc"])
    slope, intercept, r2 = linear_fit(xs, ys)
    if np.isfinite(slope):
        grid = np.linspace(min(xs), max(xs), 2)
        ax.plot(grid, slope * grid + intercept, "k--", lw=1)
    for name in concepts:
        ax.scatter([], [], color=colors[name], label=name)
    for j, shots in enumerate(sorted(results)):
        ax.scatter([], [], color="grey", marker=markers[j % len(markers)], label=f"{shots}-shot")
    ax.set(
        xlabel="CD of the concept (best layer)", ylabel="exact-match accuracy", title=f"pooled linear fit R² = {r2:.3f}"
    )
    ax.legend(fontsize=7, ncol=2)
    return fig


def plot_patching(result, concept_names: Sequence[str], shots: int) -> Figure:
    """Accuracy change per concept from positive and negative patching (bars)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(concept_names))
    pos = (result.positive - result.base).numpy()
    neg = (result.negative - result.base).numpy()
    ax.bar(x - 0.2, pos, 0.4, label="positive (own concept mean)")
    ax.bar(x + 0.2, neg, 0.4, label="negative (Null mean)")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(x, concept_names)
    ax.set(ylabel="accuracy change", title=f"mean-activation patching, layer {result.layer}, {shots}-shot")
    ax.legend(fontsize=8)
    return fig
