"""Every YAML in configs/ and callbacks/ through the real CLI, in-process, with tiny dims."""

import csv
import runpy
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEBUG, TINY_SYNTHETIC, config

from lcd.analysis.onsets import concept_onsets, format_onsets
from lcd.callbacks import ProgressLog
from lcd.cli import main, make_cli
from lcd.lit import LitPretrain
from lcd.rundir import read_history

CPU = config("configs/trainer/cpu.yaml", "configs/synthetic/cpu.yaml")
CD = config("callbacks/concept_decodability.yaml")  # as `make run`


def fit(run_dir: Path, *extra: str) -> None:
    main(["fit", *CPU, *CD, "--config", DEBUG, *TINY_SYNTHETIC, f"--trainer.default_root_dir={run_dir}", *extra])


def metrics_rows(run_dir: Path) -> list[dict[str, str]]:
    (path,) = run_dir.glob("csv/version_*/metrics.csv")
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # torch.compile of the preset's training step
def test_fit_cpu_preset_with_cd_writes_everything(run_dir):
    # The last callback is the one the CD fragment added. The preset's torch.compile stays on here, so the
    # compiled training step runs beside the CD callback's hooks.
    fit(run_dir, "--trainer.callbacks.every_n_steps=2", "--model.init_args.compile=true")
    history = read_history(run_dir / "cd_history.csv")
    assert [row["step"] for row in history] == [0, 2, 4]
    assert {"cd/layer_00", "cd/layer_01", "cd/best", "cd/best_layer", "cd/layer_01/concept_3"} <= history[0].keys()
    assert "probe/loss/concept_0" in history[0]
    # The onset table at fit end is the one lcd.analysis.onsets reads from the saved history.
    assert (run_dir / "cd_onsets.txt").read_text() == format_onsets(*concept_onsets(history)) + "\n"
    for row in history:  # the best layer is the one with the highest CD
        layers = [row["cd/layer_00"], row["cd/layer_01"]]
        assert row["cd/best"] == max(layers) and row["cd/best_layer"] == layers.index(max(layers)), row
    rows = metrics_rows(run_dir)
    keys = set().union(*rows)
    assert {"train/loss", "val/mse", "val/mse/concept_0", "val/ratio_true_basis/concept_3", "cd/layer_01"} <= keys
    assert "val/ref/least_squares_true_basis/mse_tail/concept_2" in keys
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    for png in ["cd_history.png", "cd_heatmap.png", "error_vs_position_final.png"]:
        assert (run_dir / "plots" / png).exists(), png
    # The step-0 snapshot is of that evaluation's best layer.
    best = int(history[0]["cd/best_layer"])
    assert [p.name for p in (run_dir / "plots").glob("snapshot_*")] == [f"snapshot_layer{best:02d}_step0000000.png"]
    # A checkpoint of the CLI loads back by itself: the network is rebuilt from the config in its hparams.
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    model = LitPretrain.load_from_checkpoint(ckpt, map_location="cpu")
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert model.net.backbone.config.n_layer == 2 and model.state_dict().keys() == saved.keys()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, saved[name], msg=name)


@pytest.mark.slow  # two fits
def test_train_loss_curve_does_not_depend_on_the_logging_cadence(tmp_path):
    # LitPretrain calls self.log only on the steps the loggers write: each written value must still be
    # that step's own loss (the same seed logging every step gives the reference).
    curves = {}
    for every in (1, 2):
        run_dir = tmp_path / f"every{every}"
        steps = ["--trainer.max_steps=6", "--trainer.val_check_interval=100"]
        fit(run_dir, *steps, f"--trainer.log_every_n_steps={every}")
        curves[every] = {int(r["step"]): float(r["train/loss"]) for r in metrics_rows(run_dir) if r.get("train/loss")}
    assert sorted(curves[1]) == [0, 1, 2, 3, 4, 5] and sorted(curves[2]) == [1, 3, 5]
    assert len(set(curves[1].values())) == 6
    for step, loss in curves[2].items():
        assert loss == pytest.approx(curves[1][step], rel=1e-6), step


@pytest.mark.slow  # three fits
def test_resume_continues_the_same_run_and_cd_history(tmp_path):
    fragment = tmp_path / "every2.yaml"
    fragment.write_text(
        "trainer:\n  callbacks:\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {every_n_train_steps: 2, save_last: true}\n"
        "    - {class_path: lcd.callbacks.ConceptDecodability, init_args: {every_n_steps: 2}}\n"
    )
    every = ["--config", str(fragment), "--trainer.val_check_interval=100"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    fit(straight, "--trainer.max_steps=6", *every)
    fit(broken, "--trainer.max_steps=4", *every)
    fit(broken, "--trainer.max_steps=6", *every, "--ckpt_path=last")
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(broken / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 6
    for name, tensor in a["state_dict"].items():  # same data stream and optimizer state -> same weights
        torch.testing.assert_close(b["state_dict"][name], tensor, msg=name)
    steps = [row["step"] for row in read_history(broken / "cd_history.csv")]
    assert steps == [row["step"] for row in read_history(straight / "cd_history.csv")]
    assert steps == sorted(set(steps)) and steps[0] == 0 and steps[-1] == 6
    (state,) = [v for k, v in b["callbacks"].items() if "ConceptDecodability" in k]
    assert [row["step"] for row in state["history"]] == steps


def test_paper_preset_and_gpu_trainer_yaml(run_dir):
    args = config("configs/trainer/gpu.yaml", "configs/synthetic/paper.yaml") + ["--config", DEBUG]
    overrides = ["--trainer.accelerator=cpu", "--trainer.strategy=auto", "--trainer.devices=1"]
    main(["fit", *args, *TINY_SYNTHETIC, *overrides, f"--trainer.default_root_dir={run_dir}"])
    assert "val/mse/concept_3" in set().union(*metrics_rows(run_dir))


def test_long_cd_evaluations_log_progress_and_quick_ones_stay_silent(run_dir, tmp_path, lightning_log):
    fit(run_dir, "--trainer.callbacks.every_n_steps=2")  # default progress_every_s: the tiny probe is quick
    assert not [line for line in lightning_log.lines if line.startswith("CD | ")]
    # Every evaluation counts as long with progress_every_s=0: a line per probe batch, then the summary.
    fit(tmp_path / "watched", "--trainer.callbacks.every_n_steps=2", "--trainer.callbacks.progress_every_s=0")
    lines = [line for line in lightning_log.lines if line.startswith("CD | step 0 | ")]
    history = read_history(tmp_path / "watched" / "cd_history.csv")
    best, layer = history[0]["cd/best"], int(history[0]["cd/best_layer"])
    assert lines[0].startswith("CD | step 0 | 1/")
    assert lines[-1].startswith(f"CD | step 0 | best {best:.3f} at layer {layer} | ")
    assert " probe prompts in " in lines[-1]
    assert [line.split(" | ")[1] for line in lightning_log.lines if " probe prompts in " in line] == [
        f"step {int(row['step'])}" for row in history
    ]


def test_fit_logs_progress_lines_when_output_is_not_a_terminal(run_dir, tmp_path, lightning_log):
    # Under pytest stdout is captured, as in a job's log file. every_s=0: a line at every step and batch.
    fit(run_dir, "--progress.every_s=0")
    steps = [line for line in lightning_log.lines if line.startswith("fit | step ")]
    assert [line.split(" | ")[1] for line in steps] == ["step 1/4", "step 2/4", "step 3/4", "step 4/4"]
    assert " s/step | train/loss " in steps[-1] and steps[-1].endswith("left ~0m00s")
    validation = [line for line in lightning_log.lines if line.startswith("fit | validation at step ")]
    assert [line.split(" | ")[1:3] for line in validation] == [  # the tiny probe set is one batch
        ["validation at step 2", "batch 1/1"],
        ["validation at step 4", "batch 1/1"],
    ]
    lightning_log.lines.clear()
    fit(tmp_path / "quiet", "--progress.every_s=null")
    assert not [line for line in lightning_log.lines if line.startswith("fit | ")]
    with pytest.raises(ValueError, match="progress every_s must be >= 0"):
        ProgressLog(every_s=-1)


def test_a_fit_shows_no_deprecation_warnings_the_libraries_raise_about_each_other(run_dir, recwarn):
    fit(run_dir)
    assert not [w for w in recwarn if "LeafSpec" in str(w.message)]  # Lightning on torch's pytree API


def test_wandb_runs_offline_inside_the_run_directory(run_dir, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(run_dir / "no_netrc"))
    main(["fit", *CPU, *TINY_SYNTHETIC, f"--trainer.default_root_dir={run_dir}", "--trainer.max_steps=2",
          "--trainer.val_check_interval=1", "--trainer.limit_val_batches=1"])  # fmt: skip
    assert list((run_dir / "wandb").glob("offline-run-*")), "no offline W&B run under the run directory"
    assert (run_dir / "wandb_run_id.txt").exists()


def test_impossible_task_fails_before_training(run_dir):
    with pytest.raises(SystemExit, match="n_concepts \\* rank <= n_dims"):
        fit(run_dir, "--data.init_args.task.init_args.rank=3")
    assert not (run_dir / "checkpoints").exists()


def test_task_sizes_are_written_once_and_reach_the_network(run_dir):
    # The presets give n_dims/n_pairs only on the task; the CLI links them to the network (lcd.configs.LINKS).
    sizes = ["--data.init_args.task.init_args.n_dims=8", "--data.init_args.task.init_args.n_pairs=5"]
    cli = make_cli(
        [*CPU, "--config", DEBUG, *TINY_SYNTHETIC, *sizes, f"--trainer.default_root_dir={run_dir}"], run=False
    )
    assert (cli.model.net.n_dims, cli.model.net.n_pairs) == (8, 5)
    assert cli.model.net.read_in.in_features == 8


def test_command_line_parses_without_lightnings_args_warning(run_dir, monkeypatch, recwarn):
    # `lcd fit ...` hands LightningCLI the command line it resolved, with the same words in sys.argv.
    argv = [*CPU, "--config", DEBUG, *TINY_SYNTHETIC, f"--trainer.default_root_dir={run_dir}"]
    monkeypatch.setattr(sys, "argv", ["lcd", "fit", *argv])
    make_cli(argv, run=False)
    assert not [w for w in recwarn if "args parameter is intended" in str(w.message)]


def test_model_task_mismatch_fails_before_training(tmp_path):
    # Built in Python (no CLI link), a network of another size is refused at setup, before any step.
    import lightning as L

    from lcd.data import SyntheticICLDataModule
    from lcd.models import ICLTransformer
    from lcd.tasks import SparseRegressionTask

    model = LitPretrain(ICLTransformer(n_dims=7, n_pairs=8, n_layers=1, d_model=16, n_heads=2))
    data = SyntheticICLDataModule(SparseRegressionTask(n_dims=4, n_concepts=4, rank=1, n_pairs=8), batch_size=4)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"task has n_dims=4 but the model was built with n_dims=7"):
        trainer.fit(model, datamodule=data)
    assert trainer.global_step == 0


def test_cd_layer_out_of_range_fails_before_training(run_dir, tmp_path):
    fragment = tmp_path / "cd.yaml"
    fragment.write_text(
        "trainer:\n  callbacks+:\n    - class_path: lcd.callbacks.ConceptDecodability\n      init_args: {layers: [2]}\n"
    )
    with pytest.raises(SystemExit, match="layer 2 is out of range for a model with 2 layers"):
        fit(run_dir, "--config", str(fragment))
    assert not (run_dir / "checkpoints").exists()


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


@pytest.mark.slow  # two fits
def test_lightning_command_and_python_m_lcd(tmp_path, monkeypatch):
    # The installed `lightning` script and `python -m lcd`, run in this process with their own sys.argv (a real
    # `lcd` process: test_errors.py; a real `python -m lcd` process: test_ddp.py).
    common = [*CPU, "--config", DEBUG, *TINY_SYNTHETIC]
    commands = {
        "lightning": lambda: runpy.run_path(_bin("lightning"), run_name="__main__"),
        "python -m lcd": lambda: runpy.run_module("lcd", run_name="__main__", alter_sys=True),
    }
    for i, (name, run) in enumerate(commands.items()):
        out = tmp_path / str(i)
        monkeypatch.setattr(sys, "argv", [name, "fit", *common, f"--trainer.default_root_dir={out}"])
        try:
            run()
        except SystemExit as exit_:  # the console script ends with sys.exit(main())
            assert exit_.code in (0, None), name
        assert (out / "checkpoints" / "last.ckpt").exists(), name
    # an analysis tool through the installed `lcd` script: exit status 0, its Python return value not printed
    config_yaml = next((tmp_path / "0").rglob("config.yaml"))
    ckpt = tmp_path / "0" / "checkpoints" / "last.ckpt"
    monkeypatch.setattr(sys, "argv", ["lcd", "rescore", "--config", str(config_yaml), "--ckpt", str(ckpt)])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(_bin("lcd"), run_name="__main__")
    assert exit_.value.code is None
    assert list((config_yaml.parent / "cd_checkpoints").glob("cd_history_*.csv"))  # it ran


def test_lcd_help_lists_every_subcommand_and_each_tool_explains_its_options(capsys):
    from lcd.cli import TOOLS

    main(["--help"])
    listed = capsys.readouterr().out
    for name in ["fit", "validate", "test", "predict", *TOOLS]:
        assert f"\n  {name} " in listed, name
    for name in TOOLS:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: lcd {name} "), name


def test_a_misspelt_option_ends_in_one_line_naming_it(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *CPU, "--config", DEBUG, "--model.init_args.net.init_args.n_layer=2"])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (
        "lcd: error: --model.init_args.net.init_args.n_layer: 'n_layer' is not an option of "
        "lcd.models.ICLTransformer; --help lists the options."
    )
    with pytest.raises(SystemExit):
        main(["fit", *CPU, "--config", DEBUG, "--trainer.max_steps=abc"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == "lcd: error: --trainer.max_steps: Expected a <class 'int'>. Got value: abc"


def test_help_explains_every_option(capsys):
    helps = {
        "--model.help": ("lcd.lit.LitPretrain", ["tail_positions", "How many final context positions"]),
        "--data.help": ("lcd.data.SyntheticICLDataModule", ["probe_per_concept", "Prompts per concept in the probe"]),
        "--trainer.callbacks.help": ("lcd.callbacks.ConceptDecodability", ["every_n_steps", "Evaluate every"]),
    }
    for flag, (cls, needles) in helps.items():
        with pytest.raises(SystemExit) as exit_:
            main(["fit", flag, cls])
        assert exit_.value.code in (0, None)
        text = " ".join(capsys.readouterr().out.split())  # as wrapped at any terminal width
        for needle in needles:
            assert needle in text, (flag, needle)
