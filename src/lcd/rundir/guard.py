"""The guards every ``lcd`` command passes before any work.

One process per run directory, no fresh fit over an earlier run, and only intact, safe checkpoints to resume
from (see :mod:`lcd.cli` for the user's view).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info

from lcd.rundir.checkpoints import (
    CheckpointError,
    UnreadableCheckpointError,
    check_checkpoint,
    last_checkpoint,
    newest_intact_checkpoint,
)
from lcd.rundir.directory import RunDirectoryError, RunLock, move_outputs_aside, run_outputs

__all__ = ["Guarded", "guard_run", "launched_as_rank_zero", "resolve_ckpt_path"]

_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK")
_SPECIAL_CKPT = ("best", "hpc", "registry")


def launched_as_rank_zero() -> bool:
    """Whether this process is global rank 0 (or not distributed), from the launcher's environment."""
    return all(os.environ.get(var, "0") == "0" for var in _RANK_VARIABLES)


@dataclass
class Guarded:
    """What :func:`guard_run` found: the lock it holds (rank 0 only) and the step of the checkpoint to resume."""

    lock: RunLock | None
    resume_step: int | None


def resolve_ckpt_path(value: Any, ckpt_dir: Path) -> Path | None:
    """The local file ``--ckpt_path`` names (``last``: the newest ``last*.ckpt``, as Lightning resolves it).

    ``None`` for no checkpoint, for ``last`` without one (Lightning then starts a fresh fit), and for what
    Lightning resolves itself (``best``, ``hpc``, ``registry``, URLs).
    """
    if value is None:
        return None
    text = str(value)
    if text == "last":
        return last_checkpoint(ckpt_dir)
    if text in _SPECIAL_CKPT or text.startswith("registry:") or "://" in text:
        return None
    return Path(text)


def _check_resume_checkpoint(given: Any, ckpt: Path, ckpt_dir: Path) -> int:
    """Check that ``ckpt`` is intact and safe; returns its global step.

    Raises:
        UnreadableCheckpointError: naming the newest intact checkpoint of ``ckpt_dir`` to resume from.

    """
    try:
        saved = check_checkpoint(ckpt)
    except UnreadableCheckpointError as err:
        found = newest_intact_checkpoint(ckpt_dir, skip=ckpt)
        if found is None:
            hint = (
                f"No intact checkpoint is left in {ckpt_dir}: start over with --overwrite true and no "
                "--ckpt_path, or choose another --trainer.default_root_dir."
            )
        else:
            path, step = found
            hint = (
                f"The newest intact checkpoint in {ckpt_dir} is {path} (step {step}): resume with --ckpt_path {path}."
            )
        raise UnreadableCheckpointError(f"--ckpt_path {given}: {err} {hint}") from None
    return int(saved.get("global_step", 0))


def guard_run(subcommand: str, config: Any, root: Path, ckpt_dir: Path) -> Guarded:
    """Guard the run directory ``root`` of a parsed ``lcd`` command before anything is instantiated.

    Takes the directory's lock (rank 0), checks the checkpoint to resume from, and refuses a fresh fit into a
    directory holding an earlier run's outputs unless ``--overwrite true`` (which moves them aside). Sets
    ``config.weights_only`` to True and ``config.overwrite`` to False (as saved in config.yaml).

    Raises:
        CheckpointError: ``--weights_only false``, or a truncated/unsafe checkpoint to resume from.
        RunDirectoryError: the directory is in use, or a fresh fit would replace an earlier run.

    """
    if "weights_only" in config:
        if config.weights_only is False:
            raise CheckpointError(
                "--weights_only false is refused: lcd loads checkpoints only with weights_only=True, so that "
                "loading a checkpoint cannot run code."
            )
        config.weights_only = True
    overwrite = bool(config.get("overwrite"))
    if "overwrite" in config:
        config.overwrite = False  # never saved as true in config.yaml, which may be reused as --config
    rank_zero = launched_as_rank_zero()  # DDP workers: rank 0 holds the lock and checks the directory
    guarded = Guarded(lock=None, resume_step=None)
    if rank_zero:  # first: a checkpoint of a run in progress may be half written
        guarded.lock = RunLock(root)
        guarded.lock.acquire()
    try:
        ckpt = resolve_ckpt_path(config.get("ckpt_path"), ckpt_dir)
        if ckpt is not None:
            guarded.resume_step = _check_resume_checkpoint(config.ckpt_path, ckpt, ckpt_dir)
        if rank_zero and subcommand == "fit" and ckpt is None:
            _refuse_or_move_earlier_run(root, ckpt_dir, overwrite)
    except BaseException:
        if guarded.lock is not None:
            guarded.lock.release()
        raise
    return guarded


def _refuse_or_move_earlier_run(root: Path, ckpt_dir: Path, overwrite: bool) -> None:
    outputs = run_outputs(root)
    if not outputs:
        return
    if overwrite:
        aside = move_outputs_aside(root)
        rank_zero_info(f"--overwrite: moved the earlier run's outputs from {root} into {aside}")
        return
    shown = ", ".join(outputs[:4]) + (f" and {len(outputs) - 4} more" if len(outputs) > 4 else "")
    elsewhere = "choose another --trainer.default_root_dir"
    overwrite_hint = f"pass --overwrite true to move them into {root}/replaced-<date>-<time>/ and start over"
    if last_checkpoint(ckpt_dir) is not None:
        ways = f"Either resume it with --ckpt_path last, or {elsewhere}, or {overwrite_hint}."
    else:
        ways = f"It has no last.ckpt to resume from: {elsewhere}, or {overwrite_hint}."
    raise RunDirectoryError(
        f"{root} already holds an earlier run's outputs ({shown}); a fresh fit would replace them. {ways}"
    )
