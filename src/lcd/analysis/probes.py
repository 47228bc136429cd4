"""``lcd probes``: finished LLM probes side by side (e.g. two models on one task), as a figure and a table.

    lcd probes runs/ewt/gemma_own runs/ewt/smollm2_own --name "Gemma 3 270M" "SmolLM2-135M" --out runs/ewt/both

Reads each run directory's ``probe/`` files (written by ``lcd validate`` with ``configs/llm/probe.yaml``;
a stopped probe's finished shot counts are enough) and writes into ``--out``:

- ``probes.png``: one column per run: CD per layer for each shot count (best layers starred, chance
  dashed), then per-concept CD at the best layer vs accuracy with the pooled fitted line;
- ``probes.md`` and ``probes.csv``: per run and shot count the best layer, its CD, mean accuracy and the
  R² of accuracy on CD, then R² pooled over the shot counts; with patching, the mean accuracy change of
  positive and negative patching (exact match and first answer token) at the patched layer.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

from lcd.analysis.stats import linear_fit
from lcd.lit.probe_report import cd_accuracy_points, number
from lcd.plotting import plot_probe_runs, save_png

__all__ = ["main", "read_probe", "summary_rows"]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_probe(run: str | Path) -> dict[int, dict]:
    """A probe run's results by shot count, as :class:`lcd.lit.probe.LitProbe` holds them (from its CSVs).

    Each entry: ``layers``, ``cd`` (tensor, per layer), ``best_layer``, ``concepts`` (name -> ``cd`` at the
    best layer, ``acc`` or None, ``n``) and, when the probe patched at that shot count, ``patching`` (the
    rows of ``patching.csv``).

    Raises:
        FileNotFoundError: ``run`` holds no finished probe (no ``probe/cd_per_layer.csv``).

    """
    probe = Path(run) / "probe"
    if not (probe / "cd_per_layer.csv").is_file():
        raise FileNotFoundError(
            f"{run} holds no finished probe ({probe / 'cd_per_layer.csv'} is missing): give the "
            "--trainer.default_root_dir of an `lcd validate --config configs/llm/probe.yaml ...` run."
        )
    results: dict[int, dict] = {}
    for row in _rows(probe / "cd_per_layer.csv"):
        res = results.setdefault(int(row["shots"]), {"layers": [], "cd": [], "concepts": {}})
        res["layers"].append(int(row["layer"]))
        res["cd"].append(float(row["cd"]))
    for row in _rows(probe / "concepts.csv"):
        res = results[int(row["shots"])]
        res["best_layer"] = int(row["best_layer"])
        acc = float(row["accuracy"]) if row["accuracy"] else None
        res["concepts"][row["concept"]] = {"cd": float(row["cd_at_best_layer"]), "acc": acc, "n": int(row["n"])}
    if (probe / "patching.csv").is_file():
        for row in _rows(probe / "patching.csv"):
            results[int(row["shots"])].setdefault("patching", []).append(row)
    for res in results.values():
        res["cd"] = torch.tensor(res["cd"])
    return results


def _patching_means(rows: list[dict[str, str]]) -> dict[str, float]:
    """Mean accuracy change over concepts of the first position and layer patched (the probe's short keys)."""
    first = [r for r in rows if (r["position"], r["layer"]) == (rows[0]["position"], rows[0]["layer"])]
    out = {"layer": float(first[0]["layer"])}
    for metric in ("", "_first_token"):
        for sign in ("positive", "negative"):
            changes = [float(r[sign + metric]) - float(r["base" + metric]) for r in first]
            out[sign + metric] = sum(changes) / len(changes)
    return out


def summary_rows(name: str, results: dict[int, dict]) -> list[dict[str, str]]:
    """One row per shot count and one pooled row (``shots`` = ``all``) of the table ``lcd probes`` writes."""
    rows = []
    for shots, res in sorted(results.items()):
        accs = [r["acc"] for r in res["concepts"].values() if r["acc"] is not None]
        row = {"run": name, "shots": str(shots), "best_layer": str(res["best_layer"])}
        row["cd_best"] = number(res["cd"].max().item(), 3)
        row["accuracy_mean"] = number(sum(accs) / len(accs), 3) if accs else ""
        row["r2"] = number(linear_fit(*cd_accuracy_points({shots: res}))[2], 3) if accs else ""
        patch = _patching_means(res["patching"]) if "patching" in res else {}
        row["patch_layer"] = str(int(patch["layer"])) if patch else ""
        for key in ("positive", "negative", "positive_first_token", "negative_first_token"):
            row[key] = f"{patch[key]:+.3f}" if patch else ""
        rows.append(row)
    pooled = {key: "" for key in rows[0]} | {"run": name, "shots": "all"}
    if any(row["r2"] for row in rows):
        pooled["r2"] = number(linear_fit(*cd_accuracy_points(results))[2], 3)
    return [*rows, pooled]


def _markdown(rows: list[dict[str, str]]) -> str:
    head = ["run", "shots", "best layer", "CD", "mean accuracy", "R²"]
    keys = ["run", "shots", "best_layer", "cd_best", "accuracy_mean", "r2"]
    if any(row["patch_layer"] for row in rows):
        head += ["patched layer", "positive", "negative", "positive (1st token)", "negative (1st token)"]
        keys += ["patch_layer", "positive", "negative", "positive_first_token", "negative_first_token"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row[k] or "" for k in keys) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict[str, str]]:
    """Parse ``argv``, write ``probes.png``, ``probes.md`` and ``probes.csv`` into ``--out``; return the rows."""
    parser = argparse.ArgumentParser(
        prog="lcd probes", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", help="run directories of finished (or stopped) LLM probes")
    parser.add_argument("--name", nargs="+", help="a name per run for the figure and table (default: the directory)")
    parser.add_argument("--out", required=True, help="directory for probes.png, probes.md and probes.csv")
    args = parser.parse_args(argv)
    names = args.name or [Path(run).name for run in args.runs]
    if len(names) != len(args.runs):
        parser.error(f"--name gives {len(names)} names for {len(args.runs)} runs: give one per run.")
    try:
        runs = {name: read_probe(run) for name, run in zip(names, args.runs, strict=True)}
    except FileNotFoundError as err:
        parser.error(str(err))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [row for name, results in runs.items() for row in summary_rows(name, results)]
    n_classes = len(next(iter(next(iter(runs.values())).values()))["concepts"])
    save_png(plot_probe_runs(runs, chance=1 / n_classes), out / "probes.png")
    with open(out / "probes.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = _markdown(rows)
    (out / "probes.md").write_text(table)
    print(table, end="")
    return rows
