"""Runs that lose nothing: safe checkpoint loading, guarded run directories, exact resume in W&B and CSV."""

import csv
import multiprocessing
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import DEBUG, ROOT, TINY_SYNTHETIC, config
from wandb_records import history, kept_by_wandb

from lcd.analysis import rescore
from lcd.cli import main
from lcd.lit import LitPretrain
from lcd.rundir import (
    CheckpointError,
    RunDirectoryError,
    RunLock,
    UnreadableCheckpointError,
    UnsafeCheckpointError,
    check_checkpoint,
    last_checkpoint,
    load_checkpoint,
    load_run,
    load_weights,
    newest_intact_checkpoint,
    read_history,
)

CPU = config("configs/trainer/cpu.yaml", "configs/synthetic/cpu.yaml")
CALLBACKS = """trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{every_n_train_steps: {ckpt_every}, save_last: true}}
    - {{class_path: lcd.callbacks.ConceptDecodability, init_args: {{every_n_steps: 2}}}}
"""
LOGGERS = """  logger:
    - {class_path: lcd.loggers.WandbLogger, init_args: {project: lcd}}
    - {class_path: lcd.loggers.CSVLogger, init_args: {name: csv}}
"""


@contextmanager
def refused(kind: type[Exception], match: str | None = None) -> Iterator[pytest.ExceptionInfo]:
    """``lcd.cli.main`` ends a user error with exit status 2; its cause is the ``kind`` that was raised."""
    with pytest.raises(SystemExit) as info:
        yield info
    assert isinstance(info.value.__cause__, kind), repr(info.value.__cause__)
    if match is not None:
        assert re.search(match, str(info.value)), str(info.value)


def fit_args(run_dir: Path, fragment: Path, *extra: str) -> list[str]:
    return ["fit", *CPU, "--config", DEBUG, *TINY_SYNTHETIC, "--config", str(fragment),
            "--trainer.val_check_interval=3", f"--trainer.default_root_dir={run_dir}", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def every2(tmp_path_factory) -> Path:
    """Checkpoints and CD every 2 steps, CSV logger only (the debug fragment's)."""
    path = tmp_path_factory.mktemp("fragments") / "every2.yaml"
    path.write_text(CALLBACKS.format(ckpt_every=2))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory, every2) -> Path:
    """A finished 4-step run: checkpoints at steps 2 and 4 (step=4.ckpt and last.ckpt kept), CD at 0, 2, 4."""
    run = tmp_path_factory.mktemp("finished") / "run"
    main(fit_args(run, every2))
    return run


@pytest.fixture
def used(finished, tmp_path) -> Path:
    """A copy of the finished run this test may change."""
    return Path(shutil.copytree(finished, tmp_path / "used"))


class _OpensFile:
    """Unpickling this creates ``path`` (the side effect a crafted checkpoint could have)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


# --- item 3: checkpoints load with weights_only=True ---------------------------------------------------------


def test_checkpoint_that_would_run_code_is_refused_by_every_loader(finished, every2, tmp_path, capsys):
    marker = tmp_path / "code_ran"
    saved = torch.load(finished / "checkpoints" / "last.ckpt", weights_only=True)  # lcd's own loads as is
    saved["extra"] = _OpensFile(marker)
    evil = tmp_path / "evil.ckpt"
    torch.save(saved, evil)
    (config_yaml,) = finished.rglob("config.yaml")

    model, _ = load_run(config_yaml, None)
    loaders = [lambda: load_weights(model, evil), lambda: load_run(config_yaml, evil), lambda: check_checkpoint(evil)]
    for load in loaders:
        with pytest.raises(UnsafeCheckpointError, match=r"would run code it contains \(it wanted io\.open; lcd loads"):
            load()
    with pytest.raises(SystemExit):
        rescore.main(["--config", str(config_yaml), "--ckpt", str(evil), "--out", str(tmp_path / "cd")])
    assert "would run code" in capsys.readouterr().err
    run = tmp_path / "resumed"
    with refused(UnsafeCheckpointError, match=f"{evil} was refused"):  # the resume path, before any work
        main(fit_args(run, every2, "--trainer.max_steps=6", f"--ckpt_path={evil}"))
    assert not (run / "checkpoints").exists()
    with pytest.raises(pickle.UnpicklingError):  # Lightning's own loader: torch's weights_only default
        LitPretrain.load_from_checkpoint(evil)
    assert not marker.exists()
    with refused(CheckpointError, match="--weights_only false is refused"):
        main(fit_args(run, every2, "--weights_only=false", f"--ckpt_path={finished / 'checkpoints' / 'last.ckpt'}"))

    torch.load(evil, weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.exists()


# --- item 6 (part): a truncated checkpoint names the newest intact one ------------------------------------------


def test_truncated_last_checkpoint_names_the_newest_intact_one_before_any_work(used, every2):
    ckpts = used / "checkpoints"
    last, intact = ckpts / "last.ckpt", ckpts / "epoch=0-step=4.ckpt"
    assert sorted(p.name for p in ckpts.iterdir()) == [intact.name, last.name]
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    before = {p: p.read_bytes() for p in used.rglob("*") if p.is_file() and p.name != ".lock"}

    with refused(UnreadableCheckpointError) as err:
        main(fit_args(used, every2, "--trainer.max_steps=6", "--ckpt_path=last"))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"--ckpt_path last: {last} is truncated or unreadable (")
    assert message.endswith(
        f"The newest intact checkpoint in {ckpts} is {intact} (step 4): resume with --ckpt_path {intact}."
    )
    after = {p: p.read_bytes() for p in used.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before  # nothing ran

    main(fit_args(used, every2, "--trainer.max_steps=6", f"--ckpt_path={intact}"))  # the advice works
    # (last-v1.ckpt: the copied run's checkpoint names the original directory, so Lightning keeps last.ckpt)
    assert load_checkpoint(last_checkpoint(ckpts))["global_step"] == 6
    assert [row["step"] for row in read_history(used / "cd_history.csv")] == [0, 2, 4, 6]


def test_corrupted_and_missing_checkpoints_are_named(finished, tmp_path):
    data = bytearray((finished / "checkpoints" / "last.ckpt").read_bytes())
    data[len(data) // 3] ^= 0xFF  # torch.load itself accepts this file: only the zip CRC tells
    flipped = tmp_path / "flipped.ckpt"
    flipped.write_bytes(bytes(data))
    with pytest.raises(UnreadableCheckpointError, match=r"flipped.ckpt is corrupted \(archive member .* CRC"):
        check_checkpoint(flipped)
    (tmp_path / "empty.ckpt").write_bytes(b"")
    assert newest_intact_checkpoint(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="nothing.ckpt does not exist"):
        check_checkpoint(tmp_path / "nothing.ckpt")


# --- item 4: a run directory belongs to one run -------------------------------------------------------------


@pytest.mark.slow  # a validate and two fits
def test_fresh_fit_into_a_used_run_directory_is_refused_and_overwrite_moves_it_aside(used, every2):
    history = (used / "cd_history.csv").read_text()
    n_rows = len(read_history(used / "cd_history.csv"))
    with refused(RunDirectoryError) as err:
        main(fit_args(used, every2))
    message = str(err.value)
    assert message.startswith(f"{used} already holds an earlier run's outputs (checkpoints/epoch=0-step=4.ckpt, ")
    assert message.endswith(
        "a fresh fit would replace them. Either resume it with --ckpt_path last, or choose another "
        f"--trainer.default_root_dir, or pass --overwrite true to move them into {used}/replaced-<date>-<time>/ "
        "and start over."
    )
    assert (used / "cd_history.csv").read_text() == history and len(read_history(used / "cd_history.csv")) == n_rows
    assert not list(used.glob("csv/version_1"))

    # validate/test evaluate a finished run in its directory: allowed, in a CSV version of their own
    main(["validate", *fit_args(used, every2, "--ckpt_path=last")[1:]])
    assert (used / "csv" / "version_1" / "metrics.csv").exists()
    assert (used / "cd_history.csv").read_text() == history
    aside = used.parent / "checkpoints_aside"
    (used / "checkpoints").rename(aside)
    with refused(RunDirectoryError, match="It has no last.ckpt to resume from: choose another"):
        main(fit_args(used, every2, "--ckpt_path=last"))  # nothing to resume: a fresh fit, refused as well
    aside.rename(used / "checkpoints")

    main(fit_args(used, every2, "--overwrite=true", "--trainer.max_steps=2"))
    (aside,) = used.glob("replaced-*")
    assert (aside / "cd_history.csv").read_text() == history  # nothing deleted
    assert {p.name for p in (aside / "checkpoints").iterdir()} == {"epoch=0-step=4.ckpt", "last.ckpt"}
    assert [row["step"] for row in read_history(used / "cd_history.csv")] == [0, 2]
    (saved_config,) = used.glob("csv/version_*/config.yaml")
    assert "overwrite: false" in saved_config.read_text()  # reusing the saved config never overwrites


def test_guard_refuses_a_fresh_fit_over_outputs_and_moves_them_aside_on_overwrite(tmp_path):
    from jsonargparse import Namespace

    from lcd.rundir.guard import guard_run

    root = tmp_path / "run"
    (root / "checkpoints").mkdir(parents=True)
    (root / "checkpoints" / "step=2.ckpt").write_bytes(b"x")
    (root / "cd_history.csv").write_text("step\n0\n")
    with pytest.raises(RunDirectoryError, match="It has no last.ckpt to resume from"):
        guard_run("fit", Namespace(ckpt_path=None, overwrite=False), root, root / "checkpoints")
    assert (root / "cd_history.csv").is_file()
    guarded = guard_run("validate", Namespace(ckpt_path=None), root, root / "checkpoints")  # evaluation: allowed
    guarded.lock.release()
    config = Namespace(ckpt_path=None, overwrite=True, weights_only=None)
    guarded = guard_run("fit", config, root, root / "checkpoints")
    guarded.lock.release()
    (aside,) = root.glob("replaced-*")
    assert (aside / "cd_history.csv").read_text() == "step\n0\n" and not (root / "cd_history.csv").exists()
    assert config.overwrite is False and config.weights_only is True  # as config.yaml saves them
    with pytest.raises(CheckpointError, match="--weights_only false is refused"):
        guard_run("fit", Namespace(ckpt_path=None, weights_only=False), root, root / "checkpoints")


def _hold_lock(run: Path, ready) -> None:
    RunLock(run).acquire()
    ready.send("locked")
    time.sleep(600)


def test_second_process_on_a_run_directory_is_refused(tmp_path, every2):
    run = tmp_path / "run"
    fork = multiprocessing.get_context("fork")  # a second process without a second start-up of Python and torch
    ready, child_end = fork.Pipe()
    holder = fork.Process(target=_hold_lock, args=(run, child_end), daemon=True)
    holder.start()
    child_end.close()  # the holder's end only: if it dies before locking, recv() raises EOFError
    try:
        assert ready.recv() == "locked"
        with refused(RunDirectoryError, match=rf"{run} is in use by another process \(PID {holder.pid} on "):
            main(fit_args(run, every2))
        assert not (run / "checkpoints").exists()
    finally:
        holder.kill()  # as kill -9: the operating system releases its lock
        holder.join()
    lock = RunLock(run)
    lock.acquire()
    lock.release()


# --- items 5 and 7: kill -9, resume, and every step once in W&B and in metrics.csv ----------------------------


def kill_and_resume(root: Path, kill_step: int) -> Path:
    """A 10-step run killed (SIGKILL) in ``on_train_batch_end`` of ``kill_step``, resumed with ``--ckpt_path last``.

    Checkpoints every 4 steps, CD every 2, validation every 3, W&B offline and CSV loggers.
    """
    killing = root / "killing.yaml"
    killing.write_text(
        CALLBACKS.format(ckpt_every=4)
        + f"    - {{class_path: kill_at.KillAt, init_args: {{step: {kill_step}, wait: 3}}}}\n"
        + LOGGERS
    )
    run = root / "broken"
    env = dict(os.environ, WANDB_MODE="offline")
    env.pop("WANDB_SERVICE", None)  # its own W&B service, as a separate command has (not this process's)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "tests"), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "lcd", *fit_args(run, killing, "--trainer.max_steps=10")],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    main(fit_args(run, plain_fragment(root), "--trainer.max_steps=10", "--ckpt_path=last"))
    return run


def plain_fragment(root: Path) -> Path:
    path = root / "plain.yaml"
    path.write_text(CALLBACKS.format(ckpt_every=4) + LOGGERS)
    return path


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """Killed during step 7 (after CD at 6), resumed from the step-4 checkpoint; and the same run uninterrupted."""
    root = tmp_path_factory.mktemp("kill")
    straight = root / "straight"
    main(fit_args(straight, plain_fragment(root), "--trainer.max_steps=10"))
    return kill_and_resume(root, kill_step=7), straight


def wandb_parts(run: Path) -> list[list[dict]]:
    """The history rows of each offline W&B directory of a run, in order of start."""
    return [history(d) for d in sorted((run / "wandb").glob("offline-run-*"))]


def _scalars(row: dict) -> dict:
    return {k: v for k, v in row.items() if k.split("/")[0] in ("cd", "probe", "train", "val")}


@pytest.mark.slow  # a killed subprocess and a resumed run
def test_resumed_run_shows_every_step_once_in_wandb(killed_and_resumed):
    broken, straight = killed_and_resumed
    first, resumed = wandb_parts(broken)
    for row in first + resumed:  # W&B's step is the trainer's step
        assert row["_step"] == row["trainer/global_step"]
    assert resumed[0]["_step"] == 4  # the checkpoint's step, not 0
    kept = kept_by_wandb([first, resumed])
    assert kept[-1]["_step"] == 10 and first[-1]["_step"] < 7  # part of what the killed run did never reached W&B

    cd_steps = [row["_step"] for row in kept if "cd/best" in row]
    history_rows = read_history(broken / "cd_history.csv")
    assert cd_steps == [row["step"] for row in history_rows] == [0, 2, 4, 6, 8, 10]
    for row, saved in zip([r for r in kept if "cd/best" in r], history_rows, strict=True):
        for key in ("cd/best", "cd/layer_01", "cd/layer_00/concept_2"):
            assert row[key] == pytest.approx(saved[key]), (row["_step"], key)
    assert [row["_step"] for row in kept if "train/loss" in row] == list(range(10))

    (reference,) = [history(d) for d in (straight / "wandb").glob("offline-run-*")]
    assert [row["_step"] for row in kept] == [row["_step"] for row in reference]
    for row, expected in zip(kept, reference, strict=True):  # the same values as the uninterrupted run
        assert _scalars(row) == _scalars(expected), row["_step"]


@pytest.mark.slow  # a killed subprocess and a resumed run
def test_resumed_run_keeps_one_metrics_csv_with_one_row_per_step(killed_and_resumed):
    broken, straight = killed_and_resumed

    def rows(run: Path) -> list[dict[str, str]]:
        (path,) = run.glob("csv/version_*/metrics.csv")
        with path.open() as f:
            return list(csv.DictReader(f))

    resumed = rows(broken)
    assert [int(row["step"]) for row in resumed] == list(range(11))
    assert resumed == rows(straight)
    assert {"train/loss", "val/mse", "cd/best", "cd/layer_01"} <= resumed[0].keys()


@pytest.mark.slow  # a killed subprocess and a resumed run
def test_cd_of_the_checkpoint_step_reaches_wandb_and_csv_when_killed_right_after_it(tmp_path):
    # Killed during step 5: the rows of steps 3 and 4 were still held by the loggers (a row is committed once a
    # step two later is logged). The resumed fit replays step 4 on, and the CD callback logs the checkpoint's own
    # evaluation (step 4) again. (The training loss of step 3, logged after the step-4 checkpoint, is the one
    # value such a kill loses: see lcd.loggers.WandbLogger.)
    run = kill_and_resume(tmp_path, kill_step=5)
    first, resumed = wandb_parts(run)
    assert first[-1]["_step"] < 4 and resumed[0]["_step"] == 4
    saved = read_history(run / "cd_history.csv")
    assert [row["step"] for row in saved] == [0, 2, 4, 6, 8, 10]
    kept = [row for row in kept_by_wandb([first, resumed]) if "cd/best" in row]
    assert [row["_step"] for row in kept] == [row["step"] for row in saved]
    for row, expected in zip(kept, saved, strict=True):
        assert row["cd/best"] == pytest.approx(expected["cd/best"]), row["_step"]
    ((path,),) = [list(run.glob("csv/version_*/metrics.csv"))]
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows if r["cd/best"]] == [0, 2, 4, 6, 8, 10]
    assert [int(r["step"]) for r in rows] == sorted({int(r["step"]) for r in rows})
