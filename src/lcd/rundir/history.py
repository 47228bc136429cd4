"""The CD history of a run: one row per evaluation, saved as ``<run_dir>/cd_history.csv``.

Written by the :class:`~lcd.callbacks.ConceptDecodability` callback (and ``lcd rescore``), read by
``lcd onsets`` and the plots. Columns: ``step``, ``cd/best``, ``cd/best_layer``, ``cd/layer_XX``,
``cd/layer_XX/concept_<k>`` and ``probe/loss/concept_<k>`` (layers 0-based, zero-padded).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import torch

HISTORY_FILE = "cd_history.csv"
ONSETS_FILE = "cd_onsets.txt"

__all__ = ["HISTORY_FILE", "ONSETS_FILE", "history_row", "read_history", "write_history"]


def history_row(
    step: int,
    layers: Sequence[int],
    cd: torch.Tensor,
    per_concept: torch.Tensor,
    classes: torch.Tensor,
    loss_per_concept: torch.Tensor,
) -> dict[str, float]:
    """One evaluation as a row of ``cd_history.csv``.

    Keys: ``step``, ``cd/best``, ``cd/best_layer``, ``cd/layer_XX``, ``cd/layer_XX/concept_<k>`` and
    ``probe/loss/concept_<k>``.

    Args:
        step: Training step of the evaluated weights.
        layers: The 0-based layers ``cd`` refers to, in order.
        cd: (L,) CD per layer.
        per_concept: (L, C) CD per layer and concept.
        classes: (C,) concept ids of ``per_concept``'s columns.
        loss_per_concept: (n_concepts,) mean probe loss of each concept.

    """
    best = int(cd.argmax())
    row: dict[str, float] = {"step": step, "cd/best": cd[best].item(), "cd/best_layer": layers[best]}
    for i, layer in enumerate(layers):
        row[f"cd/layer_{layer:02d}"] = cd[i].item()
        for j, c in enumerate(classes.tolist()):
            row[f"cd/layer_{layer:02d}/concept_{c}"] = per_concept[i, j].item()
    for c, loss in enumerate(loss_per_concept.tolist()):
        row[f"probe/loss/concept_{c}"] = loss
    return row


def write_history(path: str | Path, rows: list[dict[str, float]]) -> None:
    """Write history rows as CSV (columns in first-seen order), replacing ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def read_history(path: str | Path) -> list[dict[str, float]]:
    """Load a ``cd_history.csv`` (empty cells are skipped)."""
    with Path(path).open() as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
