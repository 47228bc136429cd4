r"""Concept Decodability of a run's saved checkpoints, after the fact, with other probe settings.

The :class:`~lcd.callbacks.ConceptDecodability` callback measures CD live with one setting. To ask
whether a result depends on that setting (another token position, cosine instead of Euclidean distance,
a linear probe instead of k-NN), score the checkpoints a run kept (``--config
callbacks/keep_checkpoints.yaml`` keeps one every 2,000 steps)::

    lcd rescore --config runs/synthetic_cpu/config.yaml \
        --ckpt runs/synthetic_cpu/checkpoints/step=*.ckpt --position query last_y \
        --distance euclidean cosine --linear-probe

Every checkpoint is scored on the run's own fixed probe set (the datamodule's ``probe_dataloader``:
the callback's prompts when ``--probe-per-concept`` equals the callback's ``probe_per_concept``) for
every combination of ``--position`` and ``--distance``. Each combination writes
``<out>/cd_history_<position>_<distance>.csv`` in the callback's ``cd_history.csv`` format, one row
per checkpoint in step order (with ``--linear-probe`` also ``linear/layer_XX``: the held-out accuracy
of a logistic regression, the same for every distance), and
``<out>/plots/cd_history_<position>_<distance>.png``. ``<out>`` defaults to
``<config's directory>/cd_checkpoints``. Positions are those the run's module ``probe`` accepts (the
synthetic model: ``query``, ``last_y``). Checkpoints of the same step (``last.ckpt`` beside
``step=N.ckpt``) are scored once. Runs on the CPU. Made for synthetic pretraining runs (a module with
``probe`` and a datamodule whose ``probe_dataloader`` needs no trainer); finetuning runs measure CD
through the callback.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path
from typing import get_args

import lightning as L
import torch

from lcd.activations import POSITIONS, n_decoder_layers
from lcd.decodability import Distance, check_knn_settings, layerwise_decodability, linear_probe_accuracy
from lcd.errors import user_errors
from lcd.layers import select_layers
from lcd.plotting import plot_cd_history, save_png
from lcd.rundir import CheckpointError, history_row, load_run, load_weights, write_history


@torch.no_grad()
def probe_features(
    model: L.LightningModule, batches: list, layers: list[int], position: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``model.probe`` over the probe batches and pool them.

    Returns:
        features (L, N, d), labels (N,) and per-example loss (N,).

    """
    outputs = [model.probe(batch, layers, position=position) for batch in batches]
    features, labels, loss = zip(*outputs, strict=True)
    return torch.cat(features, dim=1).float(), torch.cat(labels), torch.cat(loss).float()


def score(
    features: torch.Tensor,
    labels: torch.Tensor,
    loss: torch.Tensor,
    n_concepts: int,
    step: int,
    layers: list[int],
    k: int,
    distance: Distance,
) -> dict[str, float]:
    """One ``cd_history.csv`` row for pooled probe features (see :func:`~lcd.callbacks.decodability.history_row`)."""
    cd, per_concept, classes = layerwise_decodability(features, labels, k, distance)
    loss_sum = torch.zeros(n_concepts).index_add_(0, labels, loss)
    loss_count = torch.zeros(n_concepts).index_add_(0, labels, torch.ones_like(loss))
    return history_row(step, layers, cd, per_concept, classes, loss_sum / loss_count.clamp(min=1))


@user_errors("lcd rescore")
def main(argv: list[str] | None = None) -> dict[tuple[str, str], list[dict[str, float]]]:
    """Command-line entry point (see the module docstring).

    Returns:
        The history rows of every (position, distance) combination, as written to the CSVs.

    """
    parser = argparse.ArgumentParser(
        prog="lcd rescore", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="the run's config.yaml (written by lcd fit)")
    parser.add_argument(
        "--ckpt", nargs="+", required=True, help="checkpoint files to score (globs expanded by the shell)"
    )
    parser.add_argument(
        "--position", nargs="+", default=["query"], choices=POSITIONS, help="token positions to read (default: query)"
    )
    parser.add_argument(
        "--distance",
        nargs="+",
        default=["euclidean"],
        choices=get_args(Distance),
        help="k-NN distances (default: euclidean)",
    )
    parser.add_argument("--layers", type=int, nargs="+", help="0-based layers, negative from the end (default: all)")
    parser.add_argument("--k", type=int, default=10, help="neighbours of the leave-one-out k-NN (default: 10)")
    parser.add_argument(
        "--probe-per-concept", type=int, help="probe prompts per concept (default: the datamodule's probe_per_concept)"
    )
    parser.add_argument("--linear-probe", action="store_true", help="also a held-out logistic-regression probe")
    parser.add_argument("--out", help="output directory (default: <config dir>/cd_checkpoints)")
    args = parser.parse_args(argv)

    # Everything that can be wrong is checked before the first checkpoint is scored.
    missing = [c for c in args.ckpt if not Path(c).is_file()]
    if missing:
        parser.error(f"checkpoint(s) not found: {', '.join(missing)}")
    model, data = load_run(args.config, None)
    if not hasattr(model, "probe") or not hasattr(data, "probe_dataloader"):
        parser.error(f"{type(model).__name__} / {type(data).__name__} have no probe() / probe_dataloader().")
    per_concept = args.probe_per_concept or getattr(data, "probe_per_concept", None)
    try:
        check_knn_settings(
            args.k,
            smallest_class=per_concept,
            k_name="--k",
            class_name="each concept of the probe set (--probe-per-concept or the run's probe_per_concept)",
            grow="pass --probe-per-concept {n}",
        )
    except ValueError as err:
        parser.error(str(err))
    layers = select_layers(args.layers, n_decoder_layers(model))
    batches = list(data.probe_dataloader(args.probe_per_concept))
    for position in args.position:
        try:
            model.probe(batches[0], layers[:1], position=position)
        except ValueError as err:
            parser.error(f"--position {position}: {err}")
    n_concepts = len(data.concept_names)
    by_step: dict[int, str] = {}  # every checkpoint must fit the run's model; one per step, in step order
    for ckpt in args.ckpt:
        try:
            step = load_weights(model, ckpt)
        except CheckpointError as err:  # unsafe to load, truncated or corrupted
            parser.error(str(err))
        except RuntimeError as err:
            parser.error(f"{ckpt} does not fit the model of {args.config}: {err}")
        if step in by_step:
            print(f"{ckpt}: step {step} is also {by_step[step]}, scored once")
        by_step.setdefault(step, ckpt)

    out = Path(args.out or Path(args.config).parent / "cd_checkpoints")
    histories: dict[tuple[str, str], list[dict[str, float]]] = {
        key: [] for key in itertools.product(args.position, args.distance)
    }
    for step, ckpt in sorted(by_step.items()):
        load_weights(model, ckpt)
        model.eval()
        for position in args.position:
            features, labels, loss = probe_features(model, batches, layers, position)
            linear = {}
            if args.linear_probe:
                linear = {
                    f"linear/layer_{layer:02d}": linear_probe_accuracy(features[i], labels)
                    for i, layer in enumerate(layers)
                }
            for distance in args.distance:
                row = score(features, labels, loss, n_concepts, step, layers, args.k, distance) | linear
                histories[position, distance].append(row)
                cds = " ".join(f"{row[f'cd/layer_{layer:02d}']:.2f}" for layer in layers)
                print(f"step {step:>7} {position:>8} {distance:>9}: CD per layer {cds}")

    for (position, distance), rows in histories.items():
        name = f"cd_history_{position}_{distance}"
        write_history(out / f"{name}.csv", rows)
        save_png(plot_cd_history(rows, layers), out / "plots" / f"{name}.png")
    print(f"wrote {len(histories)} histories of {len(by_step)} checkpoints to {out}")
    return histories
