"""Every figure lcd draws, saved as PNG in the run directory and logged beside the W&B curves.

Training (synthetic): CD history and heatmap, representation snapshots, error vs position. LLM probe: CD
per layer for each shot count, CD vs accuracy with the fitted line, patching effects. Analyses: the
synthetic patching matrix, the Table-1 comparison of ``lcd compare``.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import matplotlib

matplotlib.use("Agg")  # headless: figures go to files and W&B, never to a window
from collections.abc import Sequence  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from lcd.analysis.stats import linear_fit  # noqa: E402
from lcd.rundir import run_dir  # noqa: E402


def save_figure(trainer: L.Trainer, fig: Figure, name: str) -> Path | None:
    """Save ``fig`` to ``<run_dir>/plots/<name>.png`` (rank 0 only), log it to W&B, close it.

    Returns:
        The PNG path on rank 0, else ``None``.

    """
    if not trainer.is_global_zero:
        plt.close(fig)
        return None
    path = save_png(fig, run_dir(trainer) / "plots" / f"{name}.png")
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):
            logger.log_image(key=f"plots/{name.split('_step')[0]}", images=[str(path)], step=trainer.global_step)
    return path


def save_png(fig: Figure, path: str | Path) -> Path:
    """Save ``fig`` as a PNG at ``path`` (creating its directory) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _history_matrix(history: list[dict[str, float]], layers: list[int]) -> tuple[list[float], list[list[float]]]:
    steps = [row["step"] for row in history]
    return steps, [[row.get(f"cd/layer_{layer:02d}", float("nan")) for row in history] for layer in layers]


def plot_cd_history(history: list[dict[str, float]], layers: list[int]) -> Figure:
    """Per-concept probe loss (top) and CD of every layer (bottom) against training step."""
    steps, cd = _history_matrix(history, layers)
    concepts = sorted({key.rsplit("_", 1)[1] for row in history for key in row if key.startswith("probe/loss/")})
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for c in concepts:
        top.plot(steps, [row.get(f"probe/loss/concept_{c}", float("nan")) for row in history], label=f"concept {c}")
    top.set(yscale="log", ylabel="probe loss (MSE)", title="decoding: per-concept loss")
    top.legend(fontsize=7)
    cmap = plt.get_cmap("viridis")
    for i, layer in enumerate(layers):
        bottom.plot(steps, cd[i], color=cmap(i / max(len(layers) - 1, 1)), label=f"layer {layer}")
    bottom.set(xlabel="step", ylabel="CD (LOO 10-NN accuracy)", title="encoding: concept decodability per layer")
    bottom.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def plot_cd_heatmap(history: list[dict[str, float]], layers: list[int]) -> Figure:
    """Layer x step heatmap of CD."""
    steps, cd = _history_matrix(history, layers)
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(layers) + 1.8))
    image = ax.imshow(cd, aspect="auto", origin="lower", vmin=0, vmax=1, cmap="magma", interpolation="nearest")
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ticks = list(range(0, len(steps), max(len(steps) // 8, 1)))
    ax.set_xticks(ticks, [str(int(steps[t])) for t in ticks])
    ax.set(xlabel="step", ylabel="layer", title="concept decodability")
    fig.colorbar(image, ax=ax, label="CD")
    return fig


def plot_snapshot(features, labels, method: str, layer: int, step: int) -> Figure:
    """2-D PCA (or UMAP) of one layer's probe representations, coloured by concept."""
    x = features.float()
    if method == "umap":
        import umap

        xy = torch.as_tensor(umap.UMAP(n_neighbors=15, min_dist=0.1, random_state=0).fit_transform(x.numpy()))
    else:
        x = x - x.mean(0)
        xy = x @ torch.linalg.svd(x, full_matrices=False).Vh[:2].T  # top-2 principal components
    fig, ax = plt.subplots(figsize=(5, 5))
    for c in labels.unique().tolist():
        pts = xy[labels == c]
        ax.scatter(pts[:, 0], pts[:, 1], s=8, label=f"concept {c}")
    ax.set(title=f"layer {layer}, step {step} ({method.upper()})")
    ax.legend(fontsize=7)
    return fig


def plot_error_vs_position(
    curve: torch.Tensor, refs: dict[str, torch.Tensor], concept_names: Sequence[str], step: int
) -> Figure:
    """Per-concept MSE (K, n) vs number of in-context examples, with reference algorithms dashed."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    positions = torch.arange(curve.shape[1])
    for k, name in enumerate(concept_names):
        (line,) = ax.plot(positions, curve[k], label=f"model {name}")
        if "least_squares_true_basis" in refs:
            ax.plot(positions, refs["least_squares_true_basis"][k], "--", color=line.get_color(), alpha=0.6)
    styles = {"least_squares_full_dims": ":", "lasso": "-."}
    for name, style in styles.items():
        if name in refs:
            ax.plot(positions, refs[name].mean(0), style, color="k", label=f"{name} (all concepts)")
    ax.set(
        yscale="log",
        xlabel="in-context examples before the query",
        ylabel="MSE",
        title=f"error vs position, step {step} (dashed: true-basis least squares)",
    )
    ax.legend(fontsize=7)
    return fig


def plot_cd_per_layer(results: dict[int, dict], chance: float, ax: Axes | None = None) -> Figure:
    """One line of CD against layer (0-based) per shot count; chance dashed; best layers marked.

    ``ax``: draw into these axes (a panel of a larger figure) instead of a new figure.
    """
    fig, ax = plt.subplots(figsize=(6.5, 4)) if ax is None else (ax.figure, ax)
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


def plot_cd_vs_accuracy(results: dict[int, dict], ax: Axes | None = None) -> Figure:
    """Per-concept CD (at each shot count's best layer) vs exact-match accuracy, with the pooled fit.

    ``ax``: draw into these axes (a panel of a larger figure) instead of a new figure.
    """
    fig, ax = plt.subplots(figsize=(6, 4.5)) if ax is None else (ax.figure, ax)
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


def plot_probe_runs(runs: dict[str, dict[int, dict]], chance: float) -> Figure:
    """Several probes side by side, one column each: CD per layer per shot count, then CD vs accuracy."""
    fig, axes = plt.subplots(2, len(runs), figsize=(6.5 * len(runs), 9), squeeze=False)
    for j, (name, results) in enumerate(runs.items()):
        plot_cd_per_layer(results, chance, axes[0, j])
        axes[0, j].set_title(f"{name}: CD at the token before the answer")
        if any(r["acc"] is not None for res in results.values() for r in res["concepts"].values()):
            plot_cd_vs_accuracy(results, axes[1, j])
            axes[1, j].set_title(f"{name}: {axes[1, j].get_title()}")
        else:
            axes[1, j].set_axis_off()
    fig.tight_layout()
    return fig


def plot_patching(result, concept_names: Sequence[str], shots: int) -> Figure:
    """Accuracy change per concept from positive and negative patching (bars): exact match, first token."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    x = np.arange(len(concept_names))
    for ax, metric, label in zip(axes, ("exact", "first_token"), ("exact match", "first answer token"), strict=True):
        base = result.accuracy(metric, "base")
        ax.bar(x - 0.2, (result.accuracy(metric, "positive") - base).numpy(), 0.4, label="positive (own concept mean)")
        ax.bar(x + 0.2, (result.accuracy(metric, "negative") - base).numpy(), 0.4, label="negative (Null mean)")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(x, concept_names)
        ax.set(title=label)
    axes[0].set(ylabel="accuracy change")
    axes[0].legend(fontsize=8)
    where = getattr(result, "position", "query")
    fig.suptitle(f"mean-activation patching at the {where}, layer {result.layer}, {shots}-shot")
    return fig


def plot_patching_layers(results: Sequence, shots: int) -> Figure:
    """Mean accuracy change over concepts vs patched layer, per sign and position: exact match, first token."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for ax, metric, label in zip(axes, ("exact", "first_token"), ("exact match", "first answer token"), strict=True):
        for position, style in (("query", "-"), ("answer", "--")):
            rs = sorted((r for r in results if r.position == position), key=lambda r: r.layer)
            if not rs:
                continue
            layers = [r.layer for r in rs]
            for sign, color in (("positive", "C0"), ("negative", "C1")):
                delta = [(r.accuracy(metric, sign) - r.accuracy(metric, "base")).mean().item() for r in rs]
                ax.plot(layers, delta, style, color=color, marker="o", label=f"{sign}, {position}")
        ax.axhline(0, color="k", lw=0.8)
        ax.set(xlabel="patched layer", title=label)
    axes[0].set(ylabel="mean accuracy change")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"mean-activation patching per layer, {shots}-shot")
    return fig


def plot_compare(
    cd: dict[str, Sequence[float]],
    accuracy: dict[str, dict[str, float]],
    layer: int,
    groups: dict[str, Sequence[int]],
    shots: int,
) -> Figure:
    """The Table-1 comparison: pooled CD against layer per condition, and accuracy per concept per condition.

    Args:
        cd: condition -> pooled CD (concepts + Null) of every layer, 0-based.
        accuracy: condition -> concept -> exact-match accuracy (0-1).
        layer: The layer the table reads CD at (dotted line).
        groups: finetuned condition -> its trained layers (shaded in the condition's colour).
        shots: Shots of the accuracy prompts.

    """
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    colors = {name: f"C{i}" for i, name in enumerate(cd)}
    for i, (name, values) in enumerate(cd.items()):  # the first (the baseline) widest, beneath: visible where equal
        style = {"lw": 4 if i == 0 else 1.5, "zorder": 2 + i / 10, "color": colors[name]}
        left.plot(range(len(values)), values, marker="o", ms=3, label=name, **style)
        if trained := groups.get(name):
            left.axvspan(min(trained) - 0.5, max(trained) + 0.5, color=colors[name], alpha=0.08)
    left.axvline(layer, ls=":", color="k", label=f"table's layer {layer}")
    left.set(xlabel="layer (0-based; shaded: finetuned)", ylabel="CD pooled (concepts + Null)", ylim=(0, 1.02))
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_title("Concept decodability at the token before the answer")
    left.legend(fontsize=8)
    concepts = list(next(iter(accuracy.values())))
    x, width = np.arange(len(concepts)), 0.8 / len(accuracy)
    for i, (name, acc) in enumerate(accuracy.items()):
        mean = 100 * float(np.mean([acc[c] for c in concepts]))
        offset = (i - (len(accuracy) - 1) / 2) * width
        bars = [100 * acc[c] for c in concepts]
        right.bar(x + offset, bars, width, color=colors.get(name), label=f"{name} ({mean:.1f})")
    right.set_xticks(x, concepts)
    right.set(ylabel="exact-match accuracy %", title=f"{shots}-shot accuracy per concept (legend: mean)")
    right.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_patching_matrix(result, names: list[str]) -> Figure:
    """Heatmap of the MSE change (rows: source basis of the mean, columns: target basis of the prompt)."""
    fig, ax = plt.subplots(figsize=(5, 4.2))
    lim = float(result.delta.abs().max()) or 1.0
    im = ax.imshow(result.delta.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim)
    for s in range(len(names)):
        for t in range(len(names)):
            ax.text(t, s, f"{result.delta[s, t]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="target basis (prompts)", ylabel="source basis (patched mean)")
    ax.set_title(f"query MSE change, layer {result.layer}")
    fig.colorbar(im, ax=ax)
    return fig
