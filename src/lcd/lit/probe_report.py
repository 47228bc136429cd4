"""The LLM probe's reports: progress lines, the console table of a shot count, logger metrics, CSV files.

Used by :class:`lcd.lit.probe.LitProbe`; the files and their columns are listed in its module docstring.
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from lcd.analysis.stats import linear_fit
from lcd.patching import LLMPatching

__all__ = [
    "Progress",
    "batched_tokens",
    "cd_accuracy_points",
    "duration",
    "format_shot_summary",
    "number",
    "patch_metrics",
    "shot_list",
    "shot_metrics",
    "write_csv",
    "write_patching_csv",
    "write_probe_csvs",
]


def cd_accuracy_points(results: dict[int, dict]) -> tuple[list[float], list[float]]:
    """Per-concept (CD, accuracy) of every shot count in ``results`` (concepts with an accuracy)."""
    pts = [(r["cd"], r["acc"]) for res in results.values() for r in res["concepts"].values() if r["acc"] is not None]
    return [x for x, _ in pts], [y for _, y in pts]


def shot_metrics(results: dict[int, dict]) -> dict[str, float]:
    """Logger metrics of the finished shot counts (keys listed in :mod:`lcd.lit.probe`)."""
    metrics = {}
    for shots, res in sorted(results.items()):
        p, cd = f"probe/shots_{shots:02d}", res["cd"]
        metrics.update({f"{p}/cd/layer_{layer:02d}": cd[i].item() for i, layer in enumerate(res["layers"])})
        metrics.update({f"{p}/cd/best": cd.max().item(), f"{p}/cd/best_layer": float(res["best_layer"])})
        for name, r in res["concepts"].items():
            metrics[f"{p}/cd/concept_{name}"] = r["cd"]
            if r["acc"] is not None:
                metrics[f"{p}/acc/concept_{name}"] = r["acc"]
        if "fit" in res:
            metrics[f"{p}/acc/mean"] = res["acc_mean"]
            metrics[f"{p}/r2"] = res["fit"][2]
        metrics["probe/chance"] = res["chance"]
    return metrics


def patch_metrics(r: LLMPatching, metric: str, key: str, names: list[str], null_id: int) -> dict[str, float]:
    """``key/base/...`` accuracy, ``key/positive|negative/...`` change, per concept and mean."""
    base = r.accuracy(metric, "base")
    m = {f"{key}/base/concept_{names[c]}": base[c].item() for c in range(null_id)}
    m[f"{key}/base/mean"] = base.mean().item()
    for sign in ("positive", "negative"):
        delta = r.accuracy(metric, sign) - base
        m.update({f"{key}/{sign}/concept_{names[c]}": delta[c].item() for c in range(null_id)})
        m[f"{key}/{sign}/mean"] = delta.mean().item()
    return m


def write_probe_csvs(
    out: Path, results_by_shots: dict[int, dict], concept_names: list[str], generate: bool, patch_mode: str
) -> None:
    """``cd_per_layer.csv``, ``concepts.csv``, ``summary.csv``, ``answers.csv`` and ``patching.csv`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    results = sorted(results_by_shots.items())
    write_csv(
        out / "cd_per_layer.csv",
        ["shots", "layer", "cd"],
        (
            [shots, layer, f"{v:.4f}"]
            for shots, res in results
            for layer, v in zip(res["layers"], res["cd"].tolist(), strict=True)
        ),
    )
    write_csv(
        out / "concepts.csv",
        ["shots", "concept", "best_layer", "cd_at_best_layer", "accuracy", "n"],
        (
            [shots, name, res["best_layer"], f"{r['cd']:.4f}", number(r["acc"]), r["n"]]
            for shots, res in results
            for name, r in res["concepts"].items()
        ),
    )
    summary = []
    for shots, res in results:
        fit = res.get("fit", (None, None, None))
        row = [shots, res["n_prompts"], res["best_layer"], number(res["cd"].max().item()), number(res["chance"])]
        summary.append([*row, number(res.get("acc_mean")), number(fit[2]), number(fit[0]), number(fit[1])])
        summary[-1].append(f"{res['seconds']:.1f}")
    if generate:
        slope, intercept, r2 = linear_fit(*cd_accuracy_points(results_by_shots))
        n = sum(res["n_prompts"] for _, res in results)
        summary.append(["all", n, "", "", "", "", number(r2), number(slope), number(intercept), ""])
    header = ["shots", "prompts", "best_layer", "cd_best", "chance", "accuracy_mean", "r2", "slope", "intercept"]
    write_csv(out / "summary.csv", [*header, "seconds"], summary)
    if generate:
        write_csv(
            out / "answers.csv",
            ["shots", "prompt", "concept", "gold", "answer", "correct"],
            (
                [shots, i, concept_names[c], gold, answer, int(ok)]
                for shots, res in results
                for i, c, gold, answer, ok in res["answers"]
            ),
        )
    for shots, res in results:
        if "patching" in res:
            write_patching_csv(out / "patching.csv", shots, res["patching"], concept_names[:-1], patch_mode)


def write_patching_csv(path: Path, shots: int, results: list, concepts: list[str], patch_mode: str) -> None:
    """One row per position, layer and concept: exact match and first-token accuracy, base and patched."""
    cols = ["base", "positive", "negative"]
    header = ["shots", "layer", "mode", "position", "concept", "n", *cols, *(f"{c}_first_token" for c in cols)]
    write_csv(
        path,
        header,
        (
            [shots, r.layer, patch_mode, r.position, name, int(r.n[c])]
            + [f"{r.accuracy(m, sign)[c]:.4f}" for m in ("exact", "first_token") for sign in cols]
            for r in results
            for c, name in enumerate(concepts)
        ),
    )


class Progress:
    """Prompts and tokens done against a plan; a log line on the first batch, then every ``every_s`` seconds.

    Time left is the planned tokens still to compute (padding included; patching's passes too) at the
    rate measured so far: long prompts cost more per prompt, so tokens rather than prompts set the pace.
    """

    def __init__(self, plan: dict[int, tuple[int, int]], every_s: float) -> None:
        self.plan, self.every_s = plan, every_s
        self.total = sum(t for _, t in plan.values())
        self.start = self.last = time.time()
        self.computed = self.tokens = 0
        self.done: dict[int, int] = {}
        self.lines = 0

    def update(self, shots: int, prompts: int, tokens: int, computed: int) -> str | None:
        """Count one batch (``tokens`` real, ``computed`` with padding); return a line when one is due.

        ``shots`` -1 counts patching's passes (prompts are then the prompts patched and measured).
        """
        now = time.time()
        self.done[shots] = self.done.get(shots, 0) + prompts
        self.tokens, self.computed = self.tokens + tokens, self.computed + computed
        if self.lines and now - self.last < self.every_s:
            return None
        self.last, self.lines = now, self.lines + 1
        elapsed = now - self.start
        left = elapsed * max(self.total - self.computed, 0) / max(self.computed, 1)
        total = self.plan.get(shots, (0, 0))[0]
        patching = " incl. patching" if -1 in self.plan else ""
        what = "patching" if shots == -1 else f"{shots} shots"
        return (
            f"probe | {what} | {self.done[shots]}/{total} prompts | {self.tokens / max(elapsed, 1e-9):.0f} "
            f"tokens/s | elapsed {duration(elapsed)} | left ~{duration(left)} (whole probe{patching})"
        )


def batched_tokens(lengths: Sequence[int], batch_size: int, n_batches: int | None = None) -> tuple[int, int]:
    """Prompts and tokens computed (each batch padded to its longest) when served longest first."""
    lengths = sorted(lengths, reverse=True)
    chunks = [lengths[i : i + batch_size] for i in range(0, len(lengths), batch_size)][:n_batches]
    return sum(len(c) for c in chunks), sum(len(c) * c[0] for c in chunks)


def format_shot_summary(shots: int, res: dict) -> str:
    """The console table of one finished shot count (see :class:`lcd.lit.probe.LitProbe`)."""
    best, cd = res["best_layer"], res["cd"].max().item()
    head = f"probe | {shots} shots | {res['n_prompts']} prompts in {duration(res['seconds'])}"
    line = f"  best CD {cd:.3f} at layer {best} (chance {res['chance']:.3f})"
    if "fit" in res:
        line += f" | mean accuracy {res['acc_mean']:.3f} | R² (accuracy on CD) {number(res['fit'][2], 3)}"
    width = max(len("concept"), *(len(n) for n in res["concepts"]))
    rows = [f"  {'concept':<{width}}  {f'CD@{best}':>7}  {'accuracy':>8}  {'n':>5}"]
    for name, r in res["concepts"].items():
        acc = "-" if r["acc"] is None else f"{r['acc']:.3f}"
        rows.append(f"  {name:<{width}}  {r['cd']:>7.3f}  {acc:>8}  {r['n']:>5}")
    return "\n".join([head, line, *rows])


def duration(seconds: float) -> str:
    """``1h02m03s`` or ``2m03s``."""
    seconds = int(round(seconds))
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def shot_list(results: dict[int, dict]) -> str:
    """The shot counts of ``results``, ascending, comma-separated."""
    return ", ".join(str(s) for s in sorted(results))


def number(value: float | None, digits: int = 4) -> str:
    """A number for a CSV cell or a table: empty when absent, ``nan`` when undefined (e.g. R² of constant CD)."""
    if value is None:
        return ""
    return "nan" if not math.isfinite(value) else f"{value:.{digits}f}"


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence]) -> None:
    """Write a CSV whole or not at all: a temporary file, then one rename (a stop never leaves half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    os.replace(tmp, path)
