"""Figures saved as PNG in the run directory and logged beside the W&B curves."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import matplotlib

matplotlib.use("Agg")  # headless: figures go to files and W&B, never to a window
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def run_dir(trainer: L.Trainer) -> Path:
    """The run directory: ``trainer.default_root_dir``, where CSVs, plots and checkpoints land."""
    return Path(trainer.default_root_dir)


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
    import torch

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
