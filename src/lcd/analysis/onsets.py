r"""Does each concept's CD rise in step with its decoding? Onsets read from a CD history.

PAPER.md §2: each basis's loss drops suddenly, and at each drop that basis separates in the middle-layer
representation. This module turns that claim into numbers for one run. It reads a ``cd_history.csv``
(written by the :class:`~lcd.callbacks.ConceptDecodability` callback, or by ``python -m
lcd.analysis.rescore``) and, for every concept, finds

- the **decoding step**: by default the first evaluation at which the concept's probe loss, smoothed by
  a centred running median over ``window`` evaluations (at most half of them), has covered half of the way
  from its first smoothed value down to its lowest;
- the **CD step**: the same for the concept's per-concept CD at one layer, from its first smoothed value
  up to its highest. A rise smaller than ``min_rise`` counts as no rise (per-concept CD on 100 probe
  prompts has a standard error of about 0.05);
- the **lag**: CD step minus decoding step, in evaluations of the CD history (positive: the CD rise
  comes later).

The probe loss averages over every context position, as the paper's per-concept loss does, so when a
run has an early phase that every concept shares (learning to regress at all) its half-drop lands
there, not at the concept's own decoding. ``--decoding`` reads a sharper curve from the run's Lightning
``metrics.csv`` instead: the model's tail error over that of LASSO, which does not know the concept,
and the decoding step is the first validation at which the (smoothed) model beats LASSO, which it can
only do by using the concept.

::

    lcd onsets runs/synthetic_cpu/cd_history.csv [--layer 3] [--window 5] [--min-rise 0.15]
    lcd onsets runs/synthetic_cpu/cd_history.csv --decoding runs/synthetic_cpu/csv/version_0/metrics.csv

The layer defaults to the best layer of the last evaluation (``cd/best_layer``).
"""

from __future__ import annotations

import argparse
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from lcd.errors import user_errors
from lcd.rundir import read_history


@dataclass(frozen=True)
class DecodingCurve:
    """Which column holds a concept's decoding curve and when it counts as decoded.

    Attributes:
        key: Column of concept ``k``'s curve, with ``{k}`` in place of the id.
        reference_key: A column (with ``{k}``) the curve is divided by; ``None``: the curve as it is.
        below: The decoding step is the first at which the smoothed curve is at most this; ``None``: the
            first at which it covered half of the way from its first value to its lowest.

    """

    key: str = "probe/loss/concept_{k}"
    reference_key: str | None = None
    below: float | None = None

    def __post_init__(self) -> None:
        if any("{k}" not in k for k in (self.key, self.reference_key) if k is not None):
            raise ValueError(f"decoding columns need {{k}} where the concept id goes, got {self}")

    def describe(self) -> str:
        """One line naming the curve and its onset rule."""
        curve = self.key if self.reference_key is None else f"{self.key} / {self.reference_key}"
        rule = "half of its drop" if self.below is None else f"first at most {self.below:g}"
        return f"{curve.format(k='<k>')} ({rule})"

    def values(self, rows: Sequence[dict[str, float]], concept: int) -> list[tuple[int, float]]:
        """(step, value) of every row that has the concept's column(s)."""
        key = self.key.format(k=concept)
        ref = None if self.reference_key is None else self.reference_key.format(k=concept)
        return [
            (int(row["step"]), row[key] if ref is None else row[key] / row[ref])
            for row in rows
            if key in row and (ref is None or ref in row)
        ]


PROBE_LOSS = DecodingCurve()
"""The CD history's own decoding curve: each concept's probe loss over all positions, half of its drop."""

BEATS_LASSO = DecodingCurve("val/mse_tail/concept_{k}", "val/ref/lasso/mse_tail/concept_{k}", below=1.0)
"""From ``metrics.csv``: the first validation at which the model's tail error is at most LASSO's."""


@dataclass(frozen=True)
class ConceptOnset:
    """When one concept was decoded and its CD rose, in one run's history.

    Attributes:
        concept: Concept id.
        loss_start: First smoothed value of the decoding curve (the probe loss by default).
        loss_end: Lowest smoothed value of the decoding curve.
        loss_step: Training step of the decoding onset (:class:`DecodingCurve`); ``None`` when a
            ``below`` threshold is never reached.
        cd_start: First smoothed per-concept CD.
        cd_end: Highest smoothed per-concept CD.
        cd_step: Training step at which the smoothed CD first covered half of its rise; ``None`` when the
            rise is below ``min_rise``.
        lag: CD-history evaluations from ``loss_step`` to ``cd_step``, rounded (``None`` without both).

    """

    concept: int
    loss_start: float
    loss_end: float
    loss_step: int | None
    cd_start: float
    cd_end: float
    cd_step: int | None
    lag: int | None


def running_median(values: Sequence[float], window: int) -> list[float]:
    """Centred running median; the window shrinks at both ends so every value has one."""
    half = window // 2
    return [statistics.median(values[max(0, i - half) : i + half + 1]) for i in range(len(values))]


def fitted_window(window: int, n: int) -> int:
    """The running-median window used on ``n`` evaluations: ``window``, shrunk to at most half of them (odd).

    A median over most of a short curve flattens it (three evaluations under a window of 5 all become their
    median), so a short history, such as a finetuning run's three CD evaluations, is left unsmoothed.
    """
    return max(1, min(window, n // 2 - (n // 2 + 1) % 2))


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
    rows: Sequence[dict[str, float]],
    layer: int | None = None,
    window: int = 5,
    min_rise: float = 0.15,
    decoding_rows: Sequence[dict[str, float]] | None = None,
    curve: DecodingCurve = PROBE_LOSS,
) -> tuple[int, list[ConceptOnset]]:
    """Decoding and CD-rise steps of every concept in a CD history.

    Args:
        rows: Rows of a ``cd_history.csv`` in step order (:func:`lcd.callbacks.decodability.read_history`).
        layer: 0-based layer whose per-concept CD is read; ``None``: the last row's ``cd/best_layer``.
        window: Evaluations in the running median of each curve (odd; 1 disables smoothing); shrunk to at
            most half of a curve's evaluations (:func:`fitted_window`).
        min_rise: Smallest smoothed CD rise counted as a rise.
        decoding_rows: Rows (each with a ``step``, in step order) holding the decoding curves; ``None``:
            ``rows``. Rows without the concept's column are skipped (:func:`merge_by_step` for
            Lightning's ``metrics.csv``).
        curve: Which column is the decoding curve and what counts as its onset.

    Returns:
        (the layer used, one :class:`ConceptOnset` per concept in id order).

    Raises:
        ValueError: Fewer than 2 rows, an even or non-positive window, rows without a step, a layer the
            history lacks, no concept with both a decoding curve of 2 or more values and a CD column at
            that layer.

    """
    if len(rows) < 2:
        raise ValueError(f"a CD history needs at least 2 evaluations to show a change; this one has {len(rows)}")
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd number of evaluations, got {window}")
    decoding_rows = rows if decoding_rows is None else decoding_rows
    if any("step" not in row for row in [*rows, *decoding_rows]):
        raise ValueError("rows without a 'step' column: not a CD history or metrics file written by lcd")
    layers = history_layers(rows)
    if layer is None:
        if "cd/best_layer" not in rows[-1]:
            raise ValueError("the last row has no cd/best_layer; pass the layer to read")
        layer = int(rows[-1]["cd/best_layer"])
    if layer not in layers:
        raise ValueError(f"layer {layer} is not in this CD history; it has per-concept CD for layers {layers}")
    steps = [int(row["step"]) for row in rows]
    interval = statistics.median(b - a for a, b in zip(steps, steps[1:], strict=False)) or 1
    # Concepts with a CD column at this layer (a concept absent from the probe set has none) and a curve.
    cd_column = re.compile(rf"cd/layer_{layer:02d}/concept_(\d+)")
    concepts = sorted(int(m.group(1)) for k in rows[0] if (m := cd_column.fullmatch(k)))
    curves = {c: curve.values(decoding_rows, c) for c in concepts}
    curves = {c: values for c, values in curves.items() if len(values) >= 2}
    if not curves:
        raise ValueError(f"no concept has both a decoding curve {curve.describe()} and layer {layer}'s CD")
    onsets = []
    for c, values in curves.items():
        loss = running_median([v for _, v in values], fitted_window(window, len(values)))
        cd = running_median(
            [row[f"cd/layer_{layer:02d}/concept_{c}"] for row in rows], fitted_window(window, len(rows))
        )
        if curve.below is None:
            loss_index: int | None = half_way_index(loss, rising=False)[0]
        else:
            loss_index = next((i for i, v in enumerate(loss) if v <= curve.below), None)
        loss_step = None if loss_index is None else values[loss_index][0]
        cd_index, cd_start, cd_end = half_way_index(cd, rising=True)
        cd_step = steps[cd_index] if cd_end - cd_start >= min_rise else None
        onsets.append(
            ConceptOnset(
                concept=c,
                loss_start=loss[0],
                loss_end=min(loss),
                loss_step=loss_step,
                cd_start=cd_start,
                cd_end=cd_end,
                cd_step=cd_step,
                lag=None if cd_step is None or loss_step is None else round((cd_step - loss_step) / interval),
            )
        )
    return layer, onsets


def format_onsets(layer: int, onsets: Sequence[ConceptOnset], curve: DecodingCurve = PROBE_LOSS) -> str:
    """A plain-text table of :func:`concept_onsets`'s result for ``curve``."""
    lines = [
        f"per-concept CD at layer {layer} (step where its smoothed curve rose half way) against the decoding "
        f"curve {curve.describe()}",
        f"{'concept':>7}  {'decoding first -> lowest':>24}  {'step':>7}  {'CD first -> highest':>19}  {'step':>7}  lag",
    ]
    for o in onsets:
        loss_step = "never" if o.loss_step is None else str(o.loss_step)
        cd_step = "no rise" if o.cd_step is None else str(o.cd_step)
        lag = "-" if o.lag is None else f"{o.lag:+d} evaluations"
        lines.append(
            f"{o.concept:>7}  {o.loss_start:>11.3f} -> {o.loss_end:<9.3f}  {loss_step:>7}  "
            f"{o.cd_start:>8.2f} -> {o.cd_end:<6.2f}  {cd_step:>7}  {lag}"
        )
    return "\n".join(lines)


def merge_by_step(tables: Sequence[Sequence[dict[str, float]]]) -> list[dict[str, float]]:
    """Rows of several sparse tables merged into one row per step, in step order (later tables win).

    Lightning's own CSVLogger writes training and validation metrics of one step on separate rows, and runs
    resumed by earlier lcd versions have one file per part (``version_0``, ``version_1``, ...); lcd's
    CSVLogger writes one row per step to one file, resumed or not. Merging gives one curve per metric.
    """
    merged: dict[int, dict[str, float]] = {}
    for table in tables:
        for row in table:
            if "step" not in row:
                raise ValueError("rows without a 'step' column: not a metrics file written by Lightning's CSVLogger")
            merged.setdefault(int(row["step"]), {}).update(row)
    return [merged[step] for step in sorted(merged)]


@user_errors("lcd onsets")
def main(argv: list[str] | None = None) -> tuple[int, list[ConceptOnset]]:
    """Command line: print the onset table of one ``cd_history.csv``."""
    parser = argparse.ArgumentParser(
        prog="lcd onsets", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("history", help="a cd_history.csv (the run directory's, or one from lcd.analysis.rescore)")
    parser.add_argument("--layer", type=int, help="0-based layer (default: the last evaluation's best layer)")
    parser.add_argument("--window", type=int, default=5, help="evaluations in the running median (odd, default 5)")
    parser.add_argument(
        "--min-rise", type=float, default=0.15, help="smallest smoothed CD rise counted as a rise (default 0.15)"
    )
    parser.add_argument(
        "--decoding",
        nargs="+",
        metavar="METRICS_CSV",
        help="read the decoding curves from these Lightning metrics.csv files (a fit's csv/version_0/metrics.csv; "
        "runs resumed by earlier lcd versions: their versions in order); default curve: the model's tail error "
        "over LASSO's, decoded when at most 1",
    )
    parser.add_argument(
        "--decoding-key", help="column of concept k's decoding curve, {k} for the id (replaces the default curve)"
    )
    parser.add_argument(
        "--reference-key", help="column ({k} for the id) the decoding curve is divided by (replaces the default curve)"
    )
    parser.add_argument(
        "--below",
        type=float,
        help="decoded at the first smoothed value at most this (alone: changes only the default curve's threshold; "
        "a replaced curve without it is dated half way down)",
    )
    args = parser.parse_args(argv)
    files = [Path(args.history), *map(Path, args.decoding or [])]
    if missing := [str(f) for f in files if not f.is_file()]:
        parser.error(f"not a file: {', '.join(missing)}; pass a run's cd_history.csv (and csv/version_0/metrics.csv)")
    default = BEATS_LASSO if args.decoding else PROBE_LOSS
    try:
        if args.decoding_key or args.reference_key:
            curve = DecodingCurve(args.decoding_key or default.key, args.reference_key, args.below)
        else:
            curve = default if args.below is None else replace(default, below=args.below)
        decoding_rows = merge_by_step([read_history(f) for f in files[1:]]) if args.decoding else None
        layer, onsets = concept_onsets(
            read_history(files[0]), args.layer, args.window, args.min_rise, decoding_rows, curve
        )
    except ValueError as err:
        parser.error(f"{files[0]}: {err}")
    print(format_onsets(layer, onsets, curve))
    return layer, onsets
