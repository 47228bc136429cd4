r"""Source-basis x target-basis patching matrix of a trained synthetic model (PAPER.md §2, causal check).

Usage, on a run directory written by ``lcd fit`` (its ``config.yaml`` and a checkpoint)::

    lcd patch-matrix --config runs/synthetic_cpu/config.yaml \\
        --ckpt runs/synthetic_cpu/checkpoints/last.ckpt [--layer 2] [--mode replace]

The class means come from the datamodule's probe set, the patched prompts from its validation set
(different seeds). Writes ``patching_matrix.csv`` and ``plots/patching_matrix.png`` next to the config
and prints the matrix: entry (s, t) is the change of the query MSE of basis-t prompts when the query
x token is patched at ``layer`` with basis s's mean (see :func:`lcd.patching.synthetic_patching_matrix`).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from lcd.errors import user_errors
from lcd.patching import PatchMode, SyntheticPatching, synthetic_patching_matrix
from lcd.plotting import plot_patching_matrix, save_png
from lcd.rundir import load_run


@user_errors("lcd patch-matrix")
def main(argv: list[str] | None = None) -> SyntheticPatching:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="lcd patch-matrix", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="the run's config.yaml")
    parser.add_argument("--ckpt", help="checkpoint to load (default: the weights the config builds)")
    parser.add_argument("--layer", type=int, help="0-based layer; default: best CD layer on the probe set")
    parser.add_argument("--mode", choices=["replace", "add"], default="replace")
    parser.add_argument("--out", help="output directory (default: the config's directory)")
    args = parser.parse_args(argv)
    model, data = load_run(args.config, args.ckpt)
    mode: PatchMode = args.mode
    net = model.net if hasattr(model, "net") else model
    result = synthetic_patching_matrix(
        net, data.probe_dataloader(), data.val_dataloader(), data.task.n_concepts, args.layer, mode
    )
    out = Path(args.out or Path(args.config).parent)
    out.mkdir(parents=True, exist_ok=True)
    names = list(data.concept_names)
    with open(out / "patching_matrix.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "mode", "source", "target", "mse_change", "base_mse"])
        for s in range(len(names)):
            for t in range(len(names)):
                w.writerow(
                    [result.layer, mode, names[s], names[t], f"{result.delta[s, t]:.5f}", f"{result.base[t]:.5f}"]
                )
    save_png(plot_patching_matrix(result, names), out / "plots" / "patching_matrix.png")
    print(f"layer {result.layer} ({mode}); CD per layer: {[round(v, 3) for v in result.cd.tolist()]}")
    print("base query MSE per target:", [round(v, 4) for v in result.base.tolist()])
    print("MSE change (rows: source mean, columns: target prompts):")
    for s, name in enumerate(names):
        print(f"  {name:>10}: " + " ".join(f"{v:+8.4f}" for v in result.delta[s].tolist()))
    return result
