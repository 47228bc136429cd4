r"""Does each concept's CD rise in step with its loss drop? Onsets read from a CD history.

PAPER.md §2: each basis's loss drops suddenly, and at each drop that basis separates in the middle-layer
representation. This module turns that claim into numbers for one run. It reads a ``cd_history.csv``
(written by the :class:`~lcd.callbacks.ConceptDecodability` callback, or by ``python -m
lcd.cd_checkpoints``) and, for every concept, finds

- the **loss step**: the first evaluation at which the concept's probe loss, smoothed by a centred
  running median over ``window`` evaluations, has covered half of the way from its first smoothed
  value down to its lowest;
- the **CD step**: the same for the concept's per-concept CD at one layer, from its first smoothed value
  up to its highest. A rise smaller than ``min_rise`` counts as no rise (per-concept CD on 100 probe
  prompts has a standard error of about 0.05);
- the **lag**: CD step minus loss step, in evaluations (positive: the CD rise comes later).

::

    python -m lcd.emergence runs/synthetic_cpu/cd_history.csv [--layer 3] [--window 5] [--min-rise 0.15]

The layer defaults to the best layer of the last evaluation (``cd/best_layer``).
"""

from __future__ import annotations

import argparse
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ConceptOnset:
    """When one concept's loss dropped and its CD rose, in one run's history.

    Attributes:
        concept: Concept id.
        loss_start: First smoothed probe loss.
        loss_end: Lowest smoothed probe loss.
        loss_step: Training step at which the smoothed loss first covered half of its drop.
        cd_start: First smoothed per-concept CD.
        cd_end: Highest smoothed per-concept CD.
        cd_step: Training step at which the smoothed CD first covered half of its rise; ``None`` when the
            rise is below ``min_rise``.
        lag: Evaluations from ``loss_step`` to ``cd_step`` (``None`` without a CD rise).

    """

    concept: int
    loss_start: float
    loss_end: float
    loss_step: int
    cd_start: float
    cd_end: float
    cd_step: int | None
    lag: int | None


def running_median(values: Sequence[float], window: int) -> list[float]:
    """Centred running median; the window shrinks at both ends so every value has one."""
    half = window // 2
    return [statistics.median(values[max(0, i - half) : i + half + 1]) for i in range(len(values))]


def half_way_index(values: Sequence[float], rising: bool) -> tuple[int, float, float]:
    """Index at which ``values`` first cover half of the way from their first value to their extreme.

    Returns:
        (index, first value, extreme value); the extreme is the maximum when ``rising``, else the minimum.

    """
    start = values[0]
    end = max(values) if rising else min(values)
    middle = (start + end) / 2
    index = next(i for i, v in enumerate(values) if (v >= middle if rising else v <= middle))
    return index, start, end


def history_layers(rows: Sequence[dict[str, float]]) -> list[int]:
    """The 0-based layers a CD history has per-concept columns for."""
    keys = set().union(*rows)
    return sorted({int(m.group(1)) for k in keys if (m := re.fullmatch(r"cd/layer_(\d+)/concept_\d+", k))})


def concept_onsets(
    rows: Sequence[dict[str, float]], layer: int | None = None, window: int = 5, min_rise: float = 0.15
) -> tuple[int, list[ConceptOnset]]:
    """Loss-drop and CD-rise steps of every concept in a CD history.

    Args:
        rows: Rows of a ``cd_history.csv`` in step order (:func:`lcd.callbacks.decodability.read_history`).
        layer: 0-based layer whose per-concept CD is read; ``None``: the last row's ``cd/best_layer``.
        window: Evaluations in the running median (odd; 1 disables smoothing).
        min_rise: Smallest smoothed CD rise counted as a rise.

    Returns:
        (the layer used, one :class:`ConceptOnset` per concept in id order).

    Raises:
        ValueError: Fewer than 2 rows, an even or non-positive window, rows without a step, a layer the
            history lacks, or no concept with both a probe loss and a CD column at that layer.

    """
    if len(rows) < 2:
        raise ValueError(f"a CD history needs at least 2 evaluations to show a change; this one has {len(rows)}")
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd number of evaluations, got {window}")
    if any("step" not in row for row in rows):
        raise ValueError("rows without a 'step' column: not a CD history written by lcd")
    layers = history_layers(rows)
    if layer is None:
        if "cd/best_layer" not in rows[-1]:
            raise ValueError("the last row has no cd/best_layer; pass the layer to read")
        layer = int(rows[-1]["cd/best_layer"])
    if layer not in layers:
        raise ValueError(f"layer {layer} is not in this CD history; it has per-concept CD for layers {layers}")
    # Concepts with both a loss and a CD column at this layer (a concept absent from the probe set has no CD).
    concepts = sorted(
        int(k.rsplit("_", 1)[1])
        for k in rows[0]
        if k.startswith("probe/loss/concept_") and f"cd/layer_{layer:02d}/{k.rsplit('/', 1)[1]}" in rows[0]
    )
    if not concepts:
        raise ValueError(f"the CD history has no concept with both probe/loss/concept_<k> and layer {layer}'s CD")
    steps = [int(row["step"]) for row in rows]
    onsets = []
    for c in concepts:
        loss = running_median([row[f"probe/loss/concept_{c}"] for row in rows], window)
        cd = running_median([row[f"cd/layer_{layer:02d}/concept_{c}"] for row in rows], window)
        loss_index, loss_start, loss_end = half_way_index(loss, rising=False)
        cd_index, cd_start, cd_end = half_way_index(cd, rising=True)
        rose = cd_end - cd_start >= min_rise
        onsets.append(
            ConceptOnset(
                concept=c,
                loss_start=loss_start,
                loss_end=loss_end,
                loss_step=steps[loss_index],
                cd_start=cd_start,
                cd_end=cd_end,
                cd_step=steps[cd_index] if rose else None,
                lag=cd_index - loss_index if rose else None,
            )
        )
    return layer, onsets


def format_onsets(layer: int, onsets: Sequence[ConceptOnset]) -> str:
    """A plain-text table of :func:`concept_onsets`'s result."""
    lines = [
        f"per-concept CD at layer {layer}; steps where the smoothed curve covers half of its change",
        f"{'concept':>7}  {'loss first -> lowest':>20}  {'step':>7}  {'CD first -> highest':>19}  {'step':>7}  lag",
    ]
    for o in onsets:
        cd_step = "no rise" if o.cd_step is None else str(o.cd_step)
        lag = "-" if o.lag is None else f"{o.lag:+d} evaluations"
        lines.append(
            f"{o.concept:>7}  {o.loss_start:>9.3f} -> {o.loss_end:<7.3f}  {o.loss_step:>7}  "
            f"{o.cd_start:>8.2f} -> {o.cd_end:<6.2f}  {cd_step:>7}  {lag}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> tuple[int, list[ConceptOnset]]:
    """Command line: print the onset table of one ``cd_history.csv``."""
    from lcd.callbacks.decodability import read_history  # the callback imports this module

    parser = argparse.ArgumentParser(
        prog="python -m lcd.emergence", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("history", help="a cd_history.csv (the run directory's, or one from lcd.cd_checkpoints)")
    parser.add_argument("--layer", type=int, help="0-based layer (default: the last evaluation's best layer)")
    parser.add_argument("--window", type=int, default=5, help="evaluations in the running median (odd, default 5)")
    parser.add_argument(
        "--min-rise", type=float, default=0.15, help="smallest smoothed CD rise counted as a rise (default 0.15)"
    )
    args = parser.parse_args(argv)
    path = Path(args.history)
    if not path.is_file():
        parser.error(f"{path} is not a file; pass a run's cd_history.csv")
    try:
        layer, onsets = concept_onsets(read_history(path), args.layer, args.window, args.min_rise)
    except ValueError as err:
        parser.error(f"{path}: {err}")
    print(format_onsets(layer, onsets))
    return layer, onsets


if __name__ == "__main__":
    main()
