"""Wall-time overhead of the ConceptDecodability callback on the CPU preset, measured in one run.

Trains the CPU preset (``configs/trainer/cpu.yaml`` + ``configs/synthetic/cpu.yaml``, read at run time through
``lcd.cli.make_cli``) for a fixed number of steps, with and without ``callbacks/concept_decodability.yaml``
(its default cadence, snapshots included). Everything else is identical: same seed, CSV logger only, no
progress bar, validation off (``limit_val_batches=0``). Each run is a fresh subprocess; the two variants
alternate (ABBA) and repeat, and the medians are compared. Only ``trainer.fit`` is timed, less its first
training step, which carries ``torch.compile``'s one-off compilation when the preset compiles.

Inside the runs with the callback, its evaluations are timed piece by piece (probe forward, k-NN, CSV,
heatmap PNG, snapshot PNG, history PNG) by wrapping the functions it calls, so an overhead shows where it
comes from. Target (issue 3): overhead <= 5% of the training wall time.

    .venv/bin/python benchmarks/cd_callback_overhead.py --steps 1000 --repeats 3
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESET = ["configs/trainer/cpu.yaml", "configs/synthetic/cpu.yaml"]
CALLBACK = "callbacks/concept_decodability.yaml"  # as `make run`
MARK = "@@RESULT "
HOOKS = ["setup", "on_train_start", "on_train_batch_end", "on_fit_end"]


def _instrument(timings: dict[str, float], counts: dict[str, int]) -> None:
    """Wrap what the callback calls with timers (behaviour unchanged)."""
    import lcd.callbacks.decodability as cbmod
    from lcd.decodability import ConceptDecodabilityMetric
    from lcd.lit.pretrain import LitPretrain

    def timer(name, fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timings[name] += time.perf_counter() - start
                counts[name] += 1

        return wrapped

    cls = cbmod.ConceptDecodability
    for hook in HOOKS:  # everything Lightning runs of the callback
        setattr(cls, hook, timer(f"hook {hook}", getattr(cls, hook)))
    cls.evaluate = timer("evaluate (one CD evaluation)", cls.evaluate)
    cls._write_csv = timer("write cd_history.csv", cls._write_csv)
    cls._snapshot = timer("snapshot PNGs (PCA + save)", cls._snapshot)
    LitPretrain.probe = timer("probe forward (capture)", LitPretrain.probe)
    ConceptDecodabilityMetric.compute = timer("kNN CD (metric.compute)", ConceptDecodabilityMetric.compute)
    cbmod.plot_cd_heatmap = timer("heatmap figure (draw)", cbmod.plot_cd_heatmap)
    cbmod.plot_cd_history = timer("history figure (draw)", cbmod.plot_cd_history)
    cbmod.save_figure = timer("save_figure (PNG write, all)", cbmod.save_figure)


def worker(variant: str, steps: int, run_dir: str, threads: int) -> None:
    """One training run in this (fresh) process; prints a JSON result line."""
    os.environ.setdefault("WANDB_MODE", "offline")
    import torch

    if threads:
        torch.set_num_threads(threads)

    from lcd.cli import make_cli

    timings: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    if variant == "with":
        _instrument(timings, counts)
    overrides = Path(run_dir) / "overrides.yaml"
    overrides.write_text(
        "trainer:\n"
        f"  default_root_dir: {run_dir}\n"
        f"  max_steps: {steps}\n"
        "  limit_val_batches: 0\n"
        "  enable_progress_bar: false\n"
        "  enable_model_summary: false\n"
        "  logger:\n"
        "    - class_path: lcd.loggers.CSVLogger\n"
        "      init_args:\n"
        "        name: csv\n"
    )
    configs = PRESET + ([CALLBACK] if variant == "with" else []) + [str(overrides)]
    args = [arg for path in configs for arg in ("--config", path)]
    cli = make_cli(args, run=False)
    names = [type(cb).__name__ for cb in cli.trainer.callbacks]
    assert ("ConceptDecodability" in names) == (variant == "with"), names
    first_step_s = _time_first_training_step(cli.model)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    fit_s = time.perf_counter() - start
    result = {
        "variant": variant,
        # The first training step carries torch.compile's one-off compilation when the preset compiles
        # (~30 s with a cold compile cache, ~3 s with torch's on-disk cache warm; once per run, however
        # long): left out of both variants alike.
        "fit_s": fit_s - first_step_s[0],
        "first_step_s": first_step_s[0],
        "steps": cli.trainer.global_step,
        "threads": torch.get_num_threads(),
        "timings": timings,
        "counts": counts,
        "net": {k: getattr(cli.model.net.backbone.config, k) for k in ("n_layer", "n_embd", "n_head")},
    }
    print(MARK + json.dumps(result), flush=True)


def _time_first_training_step(model: object) -> list[float]:
    """Wrap ``model.training_step`` so that the duration of its first call is recorded in the returned list."""
    elapsed = [0.0]
    step = model.training_step

    @functools.wraps(step)
    def timed(*args, **kwargs):
        if elapsed[0]:
            return step(*args, **kwargs)
        start = time.perf_counter()
        out = step(*args, **kwargs)
        elapsed[0] = time.perf_counter() - start
        return out

    model.training_step = timed
    return elapsed


def run_one(variant: str, steps: int, threads: int, tmp: Path, index: int) -> dict:
    run_dir = tmp / f"{variant}_{index}"
    run_dir.mkdir(parents=True)
    cmd = [sys.executable, __file__, "--worker", variant, "--steps", str(steps), "--run-dir", str(run_dir)]
    cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
    raise RuntimeError(f"worker {variant} #{index} failed (exit {proc.returncode})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000, help="training steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant (alternating)")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads per run (0: torch's default); 1 is steadier on a busy CPU"
    )
    parser.add_argument("--keep", action="store_true", help="keep the run directories")
    parser.add_argument("--worker", choices=["with", "without"], help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.run_dir, args.threads)
        return

    tmp = Path(tempfile.mkdtemp(prefix="lcd_cd_overhead_"))
    results: dict[str, list[dict]] = {"without": [], "with": []}
    loads = [os.getloadavg()[0]]
    try:
        for i in range(args.repeats):
            order = ["without", "with"] if i % 2 == 0 else ["with", "without"]  # ABBA: cancels slow drift
            for variant in order:
                r = run_one(variant, args.steps, args.threads, tmp, i)
                results[variant].append(r)
                loads.append(os.getloadavg()[0])
                print(
                    f"  run {i + 1}/{args.repeats} {variant:>7} callback: fit {r['fit_s']:7.2f} s "
                    f"(+ first step {r['first_step_s']:.1f} s, not counted)",
                    flush=True,
                )
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    first = results["with"][0]
    print(f"\npreset: {' + '.join(PRESET)}; callback: {CALLBACK}; {first['steps']} steps; net {first['net']}")
    load = f"{min(loads):.1f}-{max(loads):.1f}"
    print(f"torch threads {first['threads']}, cpus {os.cpu_count()}, load avg (1 min) during runs {load}")
    print(f"\n{'variant':<18} {'median s':>9} {'min s':>8} {'ms/step':>8}  runs (s)")
    med = {}
    for variant in ("without", "with"):
        times = [r["fit_s"] for r in results[variant]]
        med[variant] = statistics.median(times)
        per_step = 1000 * med[variant] / results[variant][0]["steps"]
        print(f"{variant + ' callback':<18} {med[variant]:9.2f} {min(times):8.2f} {per_step:8.2f}  {times}")

    n_eval = statistics.median(r["counts"]["evaluate (one CD evaluation)"] for r in results["with"])
    print(f"\ninside the callback (median over runs; {int(n_eval)} evaluations per run):")
    print(f"{'part':<38} {'total s':>8} {'per call ms':>12} {'calls':>6} {'% of fit':>9}")
    fit_with = med["with"]
    for name in first["timings"]:
        total = statistics.median(r["timings"].get(name, 0.0) for r in results["with"])
        calls = statistics.median(r["counts"].get(name, 0) for r in results["with"])
        per_call = 1000 * total / max(calls, 1)
        print(f"{name:<38} {total:8.3f} {per_call:12.1f} {int(calls):6d} {100 * total / fit_with:8.1f}%")

    overhead = med["with"] / med["without"] - 1
    in_callback = statistics.median(sum(r["timings"][f"hook {hook}"] for hook in HOOKS) for r in results["with"])
    spread = max(
        (max(r["fit_s"] for r in runs) - min(r["fit_s"] for r in runs)) / med[v] for v, runs in results.items()
    )
    share = in_callback / med["without"]
    print(
        f"\nwall-time ratio with/without: {med['with'] / med['without']:.3f} -> overhead {100 * overhead:+.1f}% "
        f"(target <= 5%: {'PASS' if overhead <= 0.05 else 'FAIL'}); runs of one variant spread up to "
        f"{100 * spread:.0f}% of their median (the noise floor of this ratio)"
    )
    print(
        f"time spent inside the callback's hooks: {in_callback:.2f} s = {100 * share:.1f}% of the plain fit "
        f"(target <= 5%: {'PASS' if share <= 0.05 else 'FAIL'})"
    )
    project(results, med["without"] / results["without"][0]["steps"])


def project(results: dict[str, list[dict]], step_s: float) -> None:
    """Extrapolate the measured per-evaluation costs to the preset's own max_steps and cadence."""
    import yaml

    max_steps = yaml.safe_load((ROOT / PRESET[0]).read_text())["trainer"]["max_steps"]
    cb = yaml.safe_load((ROOT / CALLBACK).read_text())["trainer"]["callbacks+"][0]["init_args"]
    every, snaps = cb.get("every_n_steps", 250), cb.get("snapshot_steps") or []

    runs = results["with"]
    evals, snap = "evaluate (one CD evaluation)", "snapshot PNGs (PCA + save)"
    # one evaluation without its snapshot; one snapshot; the end of fit
    per_eval = statistics.median((r["timings"][evals] - r["timings"].get(snap, 0.0)) / r["counts"][evals] for r in runs)
    per_snap = statistics.median(r["timings"].get(snap, 0.0) / max(r["counts"].get(snap, 0), 1) for r in runs)
    history = statistics.median(r["timings"]["hook on_fit_end"] for r in runs)  # history PNG (+ last eval if new)
    n_eval = max_steps // every + 1
    n_snap_full = sum(1 for s in snaps if s <= max_steps)
    cost = n_eval * per_eval + n_snap_full * per_snap + history
    print(
        f"projected for the preset's max_steps={max_steps} (every {every} steps: {n_eval} evaluations, "
        f"{n_snap_full} snapshots): callback {cost:.1f} s vs training {max_steps * step_s:.0f} s "
        f"-> {100 * cost / (max_steps * step_s):.1f}%"
    )


if __name__ == "__main__":
    main()
