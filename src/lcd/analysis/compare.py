r"""Table 1 of PAPER.md §5 for one task family: pretrained vs early vs late finetuning vs a prompt naming the concept.

One command runs every condition through the real CLI and writes the table::

    lcd compare --task configs/llm/tasks/bitwise.yaml \
        --model configs/llm/models/gemma3_270m.yaml --out runs/compare/bitwise

Conditions (each its own run directory under ``--out``):

- ``pretrained``: the model as loaded (``lcd validate``-style evaluation, nothing trains).
- ``early`` / ``late``: ``lcd fit`` with the trainer fragment, configs/finetune/base.yaml, the early / late
  fragment and callbacks/concept_decodability.yaml.
- ``name_concept``: the pretrained model, every prompt starting with a line naming its concept.

Every condition ends with the same measurement on the trained (or untouched) model: greedy exact-match
accuracy per concept on the validation prompts (``data.eval_shots[0]`` shots) and Concept Decodability
per layer from the :class:`~lcd.callbacks.ConceptDecodability` callback on its probe set. CD is reported
at one measured layer for every condition: ``--layer``, or by default the pretrained model's best CD
layer. Both columns are the mean ± sd over the task's concepts (Null excluded); CD per concept is the
pooled leave-one-out k-NN accuracy restricted to that concept's probe prompts.

Outputs: ``<out>/table.csv``, ``<out>/table.md`` (with the notes), ``<out>/compare.png`` (pooled CD
against layer for every condition, finetuned layers shaded, beside accuracy per concept) and a W&B run
(offline without credentials) with the table and the figure. Extra ``--config`` fragments and ``--set
key=value`` overrides apply to every condition (e.g. ``--set trainer.max_steps=200`` for a reduced run).

Each finished condition leaves ``<out>/<condition>/result.json`` (its measurements and the exact CLI
arguments that made them). A later call with the same arguments reuses it instead of running the
condition again, so an interrupted comparison loses only the condition it was in, and conditions can run
in parallel processes (``--conditions early`` in one, ``--conditions late`` in another, same ``--out``)
with a last call over all of them writing the table. A ``result.json`` made with other arguments is an
error before anything runs: pass a new ``--out`` or delete that condition's directory.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lcd.callbacks.decodability import ConceptDecodability
from lcd.cli import make_cli
from lcd.errors import user_errors
from lcd.plotting import plot_compare, save_png
from lcd.rundir import RunLock, move_outputs_aside, run_outputs

__all__ = ["ConditionResult", "compare", "main", "write_figure", "write_table"]

CONDITIONS = ("pretrained", "early", "late", "name_concept")
_FRAGMENTS = {"early": "configs/finetune/early.yaml", "late": "configs/finetune/late.yaml"}
_RESULT = "result.json"  # a finished condition's measurements, beside its run


@dataclass
class ConditionResult:
    """What one condition measured."""

    condition: str
    description: str
    trained_layers: list[int] | None
    shots: int
    accuracy: dict[str, float]  # concept name -> exact-match accuracy
    cd_row: dict[str, float]  # the callback's last history row (cd/layer_XX, cd/layer_XX/concept_<k>, ...)
    n_layers: int
    concept_names: list[str] = field(default_factory=list)

    def cd_per_concept(self, layer: int) -> list[float]:
        """Per-concept CD at ``layer`` (concepts only, Null excluded)."""
        return [self.cd_row[f"cd/layer_{layer:02d}/concept_{k}"] for k in range(len(self.concept_names))]


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _condition_args(condition: str, trainer: str, configs: list[str], overrides: list[str], out: Path) -> list[str]:
    """The ``lcd`` CLI arguments (without subcommand) of one condition."""
    fragments = [trainer, "configs/finetune/base.yaml", *configs]
    extra: list[str] = []
    if condition in _FRAGMENTS:
        fragments.append(_FRAGMENTS[condition])
    else:
        extra.append("--model.init_args.method=null")
    if condition == "name_concept":
        fragments.append("configs/finetune/name_concept.yaml")
    fragments.append("callbacks/concept_decodability.yaml")  # last: it appends to the trainer's callbacks
    args = [a for f in fragments for a in ("--config", f)] + overrides + extra
    return [*args, f"--trainer.default_root_dir={out / condition}"]


def _cached_result(run_dir: Path, args: list[str]) -> ConditionResult | None:
    """The result a previous call left in ``run_dir`` with the same ``args``; None if there is none.

    Raises:
        ValueError: ``run_dir`` holds a result made with other arguments.

    """
    path = run_dir / _RESULT
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    if saved["args"] != args:
        raise ValueError(
            f"{path} was made with other arguments ({' '.join(saved['args'])}); this call would use "
            f"{' '.join(args)}. Pass a new --out, or delete {run_dir} to run this condition again."
        )
    return ConditionResult(**saved["result"])


def run_condition(condition: str, trainer: str, configs: list[str], overrides: list[str], out: Path) -> ConditionResult:
    """Build the condition's CLI (not run), fit if it trains, then measure accuracy and CD.

    The result is saved to ``<out>/<condition>/result.json`` and reused by a later call with the same
    arguments (see the module docstring).
    """
    args = _condition_args(condition, trainer, configs, overrides, out)
    cached = _cached_result(out / condition, args)
    if cached is not None:
        return cached
    with _condition_dir(out / condition):
        return _run_condition(condition, args, out)


@contextmanager
def _condition_dir(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir``'s lock while its condition runs; an interrupted earlier attempt is moved aside first.

    Raises:
        RunDirectoryError: another process is running this condition (the message names it).

    """
    lock = RunLock(run_dir)
    lock.acquire()
    try:
        if run_outputs(run_dir):  # no result.json (else it was reused): an attempt that did not finish
            print(f"{run_dir}: an unfinished earlier attempt moved into {move_outputs_aside(run_dir)}; starting again")
        yield
    finally:
        lock.release()


def _run_condition(condition: str, args: list[str], out: Path) -> ConditionResult:
    cli = make_cli(args, run=False)
    trainer, module, dm = cli.trainer, cli.model, cli.datamodule
    callbacks = [cb for cb in trainer.callbacks if isinstance(cb, ConceptDecodability)]
    if len(callbacks) != 1:
        raise ValueError(f"the configs must add exactly one ConceptDecodability callback, found {len(callbacks)}.")
    (cd,) = callbacks
    if module.method is not None:
        trainer.fit(module, datamodule=dm)  # the callback scores CD at the end of fit
        trainer.validate(module, datamodule=dm)
        cd_row = cd.history[-1]
    else:
        trainer.validate(module, datamodule=dm)  # sets up the callback too (layers resolved)
        cd_row = cd.evaluate(trainer, module)
    shots = dm.eval_shots[0]
    result = ConditionResult(
        condition=condition,
        description=module.description,
        trained_layers=getattr(module.method, "resolved_layers", None),
        shots=shots,
        accuracy=module.last_accuracy[shots],
        cd_row={key: float(value) for key, value in cd_row.items()},
        n_layers=module.n_layers,
        concept_names=dm.task.concept_names,
    )
    (out / condition).mkdir(parents=True, exist_ok=True)
    (out / condition / _RESULT).write_text(json.dumps({"args": args, "result": asdict(result)}, indent=1))
    return result


def write_table(results: list[ConditionResult], layer: int, out: Path, task: str) -> str:
    """Write ``table.csv`` and ``table.md``; return the Markdown."""
    names = results[0].concept_names
    rows = []
    for r in results:
        cd_mean, cd_sd = _mean_sd(r.cd_per_concept(layer))
        acc = [r.accuracy[n] for n in names]
        acc_mean, acc_sd = _mean_sd(acc)
        rows.append((r, cd_mean, cd_sd, 100 * acc_mean, 100 * acc_sd, r.cd_row[f"cd/layer_{layer:02d}"]))
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["condition", "description", "layer", "cd_mean", "cd_sd", "acc_mean", "acc_sd", "shots", "cd_pooled"]
                   + [f"cd_{n}" for n in names] + [f"acc_{n}" for n in names])  # fmt: skip
        for r, cm, cs, am, asd, pooled in rows:
            w.writerow([r.condition, r.description, layer, f"{cm:.4f}", f"{cs:.4f}", f"{am:.2f}", f"{asd:.2f}",
                        r.shots, f"{pooled:.4f}", *(f"{v:.4f}" for v in r.cd_per_concept(layer)),
                        *(f"{r.accuracy[n]:.4f}" for n in names)])  # fmt: skip
    lines = [
        f"### {task}: CD at layer {layer} and {results[0].shots}-shot accuracy (mean ± sd over {len(names)} concepts)",
        "",
        "| condition | finetuned | CD | accuracy % | CD pooled (+Null) |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.condition} | {r.description} | {cm:.2f} ± {cs:.2f} | {am:.1f} ± {asd:.1f} | {pooled:.2f} |"
        for r, cm, cs, am, asd, pooled in rows
    ]
    lines += [
        "",
        f"- CD: leave-one-out 10-NN accuracy over {len(names)} concepts + Null, read at layer {layer} (0-based, of "
        f"{results[0].n_layers}) at the token before the answer; per concept (the pooled classifier's accuracy on "
        "that concept's prompts), then mean ± sd. CD pooled: the same classifier's accuracy over every prompt, "
        "Null included (chance = 1 / (concepts + 1)).",
    ]
    for r in results:
        if r.condition == "late" and r.trained_layers:
            first, last = min(r.trained_layers), max(r.trained_layers)
            group = f"layers {first}-{last}" if last > first else f"layer {first}"
            if layer < first:
                lines.append(
                    f"- Late-layer finetuning ({group}) cannot change CD measured at "
                    f"layer {layer}, upstream of the finetuned layers: its CD equals the pretrained CD by "
                    "construction, not as a finding."
                )
            else:
                lines.append(f"- The measured layer {layer} lies inside or above the late group, so late finetuning "
                             "can change CD here.")  # fmt: skip
    lines.append("- name_concept: the pretrained model with a first prompt line naming the concept (no training).")
    md = "\n".join(lines) + "\n"
    (out / "table.md").write_text(md)
    return md


def write_figure(results: list[ConditionResult], layer: int, out: Path) -> Path:
    """``<out>/compare.png``: pooled CD per layer of every condition beside its accuracy per concept."""
    cd = {r.condition: [r.cd_row.get(f"cd/layer_{i:02d}", float("nan")) for i in range(r.n_layers)] for r in results}
    accuracy = {r.condition: {n: r.accuracy[n] for n in r.concept_names} for r in results}
    groups = {r.condition: r.trained_layers for r in results if r.trained_layers}
    return save_png(plot_compare(cd, accuracy, layer, groups, results[0].shots), out / "compare.png")


def log_wandb(results: list[ConditionResult], layer: int, out: Path, task: str) -> None:
    """Log the table to a W&B run (offline without credentials) under ``out``."""
    import wandb

    from lcd.loggers import WandbLogger

    logger = WandbLogger(project="lcd", name=f"compare-{task}", save_dir=str(out))
    with open(out / "table.csv") as f:
        data = list(csv.reader(f))
    logger.experiment.log(
        {
            "compare/table": wandb.Table(columns=data[0], data=data[1:]),
            "compare/figure": wandb.Image(str(out / "compare.png")),
        }
    )
    for row in data[1:]:
        logger.experiment.summary[f"compare/{row[0]}/cd"] = float(row[3])
        logger.experiment.summary[f"compare/{row[0]}/acc"] = float(row[5])
    logger.experiment.summary["compare/layer"] = layer
    logger.experiment.finish()


def compare(
    task: str,
    model: str | None = None,
    conditions: tuple[str, ...] = CONDITIONS,
    configs: tuple[str, ...] = (),
    overrides: tuple[str, ...] = (),
    layer: int | None = None,
    out: str = "runs/compare",
    wandb: bool = True,
    trainer: str = "configs/trainer/cpu.yaml",
) -> str:
    """Run the conditions and write the table (see the module docstring); returns its Markdown."""
    unknown = set(conditions) - set(CONDITIONS)
    if unknown:
        raise ValueError(f"unknown conditions {sorted(unknown)}: choose from {CONDITIONS}.")
    if layer is None and "pretrained" not in conditions:
        raise ValueError("without the pretrained condition, give --layer (the measured layer).")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    configs_all = [*([model] if model else []), task, *configs]
    sets = [f"--{s}" if not s.startswith("--") else s for s in overrides]
    order = sorted(conditions, key=CONDITIONS.index)  # pretrained first: it picks the measured layer
    for c in order:  # a stale result.json fails here, before any condition runs
        _cached_result(root / c, _condition_args(c, trainer, configs_all, sets, root))
    results = [run_condition(c, trainer, configs_all, sets, root) for c in order]
    if layer is None:
        layer = int(results[0].cd_row["cd/best_layer"])
    name = Path(task).stem
    md = write_table(results, layer, root, name)
    write_figure(results, layer, root)
    if wandb:
        log_wandb(results, layer, root, name)
    return md


@user_errors("lcd compare")
def main(argv: list[str] | None = None) -> None:
    """``lcd compare``: see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="lcd compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", required=True, help="task fragment, e.g. configs/llm/tasks/pos.yaml")
    parser.add_argument("--model", default="configs/llm/models/gemma3_270m.yaml", help="model fragment")
    parser.add_argument(
        "--trainer", default="configs/trainer/cpu.yaml", help="trainer fragment (configs/trainer/gpu.yaml on GPUs)"
    )
    parser.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS)
    parser.add_argument("--config", action="append", default=[], help="extra fragment for every condition")
    parser.add_argument("--set", action="append", default=[], help="override for every condition: key=value")
    parser.add_argument("--layer", type=int, default=None, help="measured CD layer (default: best pretrained)")
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--no-wandb", action="store_true", help="skip the W&B run")
    a = parser.parse_args(argv)
    md = compare(
        a.task, a.model, tuple(a.conditions), tuple(a.config), tuple(a.set), a.layer, a.out, not a.no_wandb, a.trainer
    )
    print(md)
