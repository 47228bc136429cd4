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
    path = None
    if trainer.is_global_zero:
        path = run_dir(trainer) / "plots" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key=f"plots/{name.split('_step')[0]}", images=[str(path)], step=trainer.global_step)
    plt.close(fig)
    return path
