"""The ``lcd`` (and ``lightning``) command: LightningCLI with lcd's run-directory conventions.

Usage::

    lcd fit --config configs/synthetic/cpu.yaml
    lcd fit --config configs/synthetic/cpu.yaml --config callbacks/concept_decodability.yaml
    lcd fit --config configs/synthetic/cpu.yaml --ckpt_path last      # resume an interrupted run
    lcd fit --help                                                     # every option, documented

Conventions added to plain LightningCLI: every logger and the checkpoints live under
``trainer.default_root_dir`` (the run directory) unless set explicitly, and a resumed run (``--ckpt_path``)
continues the same W&B run, the same ``csv/version_<n>/metrics.csv`` and the same step axis.

A run directory belongs to one run. Before any work:

- one process at a time: a second command on a directory in use (``fit``, ``validate``, ``test``,
  ``predict``) is refused, naming the process that holds it (a lock on ``<run_dir>/.lock``, released
  when that process ends, also on a crash);
- ``fit`` without ``--ckpt_path`` into a directory that holds an earlier run's outputs (checkpoints,
  ``cd_history.csv``, CSV metrics, W&B runs, plots) is refused: resume it with ``--ckpt_path last``,
  choose another ``--trainer.default_root_dir``, or pass ``--overwrite true``, which moves the old outputs
  into ``<run_dir>/replaced-<date>-<time>/`` (nothing is deleted) and starts over. ``validate``/``test``
  into a finished run's directory are allowed: they add a ``csv/version_<n>`` and continue its W&B run;
- ``--ckpt_path`` (``last`` or a file) must be an intact checkpoint: a truncated or corrupted one is
  refused, naming the newest intact checkpoint of the run and the ``--ckpt_path`` to use;
- checkpoints are loaded only with ``weights_only=True`` (tensors and plain data), so a crafted file cannot
  run code; ``--weights_only false`` is refused.

Under DDP only the process of global rank 0 takes the lock and checks the directory.

A setting or input that cannot work (an impossible option, a layer out of range, a missing or unreadable
file, a model that is not installed) ends the command with ``lcd: error: <what to fix>`` as the last line
on stderr and exit status 2; ``LCD_DEBUG=1`` shows its traceback (see :mod:`lcd.errors`).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lcd.errors import user_errors
from lcd.runs import (
    CheckpointError,
    RunDirectoryError,
    RunLock,
    UnreadableCheckpointError,
    check_checkpoint,
    last_checkpoint,
    move_outputs_aside,
    newest_intact_checkpoint,
    run_outputs,
)

_WANDB_ID_FILE = "wandb_run_id.txt"
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK")
_SPECIAL_CKPT = ("best", "hpc", "registry")


def _class_name(node: Any) -> str:
    path = node.get("class_path", "") if hasattr(node, "get") else ""
    return str(path).rsplit(".", 1)[-1]


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _launched_as_rank_zero() -> bool:
    """Whether this process is global rank 0 (or not distributed), from the launcher's environment."""
    return all(os.environ.get(var, "0") == "0" for var in _RANK_VARIABLES)


def _wandb_run_id(root: Path, resuming: bool) -> str:
    """The W&B run id of this run directory: the saved one when resuming, else a new one (saved)."""
    id_file = root / _WANDB_ID_FILE
    if resuming and id_file.exists():
        return id_file.read_text().strip()
    run_id = uuid.uuid4().hex[:8]
    if _launched_as_rank_zero():
        root.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id)
    return run_id


def _checkpoint_dir(trainer: Any, root: Path) -> Path:
    """Where the run's ModelCheckpoint writes (its ``dirpath``, else ``<run_dir>/checkpoints``)."""
    for callback in _as_list(trainer.callbacks):
        if _class_name(callback) == "ModelCheckpoint" and callback.init_args.get("dirpath"):
            return Path(callback.init_args.dirpath)
    return root / "checkpoints"


class LCDCLI(LightningCLI):
    """LightningCLI that keeps a run's loggers, checkpoints and W&B files in its run directory and guards it.

    See the module docstring for the guards (lock, no fresh fit over an earlier run, intact and safe
    checkpoints), which run right after parsing, before anything is instantiated.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._lock: RunLock | None = None
        self._resume_step: int | None = None
        try:
            super().__init__(*args, **kwargs)  # parses, instantiates and runs the subcommand
        finally:
            if self._lock is not None:
                self._lock.release()

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add ``--overwrite``."""
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="fit only: start a fresh fit in a run directory that holds an earlier run's outputs, after moving "
            "them (checkpoints/, csv/, wandb/, plots/, cd_history.csv, ...) into <run_dir>/replaced-<date>-<time>/; "
            "nothing is deleted. Without it such a fit is refused (resume it with --ckpt_path last instead).",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then guard the run directory and check the checkpoint to resume from, before any work."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand:
            self._guard(subcommand, self.config[subcommand])

    def _guard(self, subcommand: str, config: Any) -> None:
        root = Path(config.trainer.default_root_dir or "runs/default")
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
        rank_zero = _launched_as_rank_zero()  # DDP workers: rank 0 holds the lock and checks the directory
        if rank_zero:  # first: a checkpoint of a run in progress may be half written
            self._lock = RunLock(root)
            self._lock.acquire()
        ckpt_dir = _checkpoint_dir(config.trainer, root)
        ckpt = self._resolve_ckpt_path(config.get("ckpt_path"), ckpt_dir)
        if ckpt is not None:
            self._resume_step = self._check_resume_checkpoint(config.ckpt_path, ckpt, ckpt_dir)
        if not rank_zero or subcommand != "fit" or ckpt is not None:
            return
        outputs = run_outputs(root)
        if outputs and overwrite:
            aside = move_outputs_aside(root)
            rank_zero_info(f"--overwrite: moved the earlier run's outputs from {root} into {aside}")
        elif outputs:
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

    @staticmethod
    def _resolve_ckpt_path(value: Any, ckpt_dir: Path) -> Path | None:
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

    @staticmethod
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
                    f"The newest intact checkpoint in {ckpt_dir} is {path} (step {step}): resume with "
                    f"--ckpt_path {path}."
                )
            raise UnreadableCheckpointError(f"--ckpt_path {given}: {err} {hint}") from None
        return int(saved.get("global_step", 0))

    def before_instantiate_classes(self) -> None:
        """Point loggers and checkpoints at the run directory; continue the W&B run and CSV file on resume."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.trainer
        root = Path(trainer.default_root_dir or "runs/default")
        trainer.default_root_dir = str(root)
        resuming = bool(config.get("ckpt_path"))
        for logger in _as_list(trainer.logger):
            if not hasattr(logger, "get") or "init_args" not in logger:
                continue
            args = logger.init_args
            if args.get("save_dir") in (None, ".", "lightning_logs"):
                args.save_dir = str(root)
            if _class_name(logger) == "WandbLogger" and not args.get("id"):
                args.id = _wandb_run_id(root, resuming)
            lcd_logger = str(logger.get("class_path", "")).startswith("lcd.loggers.")
            if lcd_logger and _class_name(logger) == "WandbLogger" and self.subcommand != "fit":
                args.align_steps = False  # validate/test (and make_cli(run=False) users) keep W&B's counter
            if lcd_logger and _class_name(logger) == "CSVLogger" and self.subcommand == "fit":
                # A fit's CSV is version_0 (a fresh fit never lands on an earlier run's CSV, see _guard), so
                # a resume continues it even after validate/test runs added version_1, ...
                if args.get("version") is None:
                    args.version = 0
                args.resume_from_step = self._resume_step
        for callback in _as_list(trainer.callbacks):
            if _class_name(callback) == "ModelCheckpoint" and not callback.init_args.get("dirpath"):
                callback.init_args.dirpath = str(root / "checkpoints")


def make_cli(args: list[str] | None = None, run: bool = True) -> LCDCLI:
    """Build (and by default run) the lcd LightningCLI.

    Args:
        args: Command-line arguments; ``None`` reads ``sys.argv``. Tests pass a list.
        run: Run the subcommand; ``False`` only parses and instantiates.

    """
    return LCDCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_env": False},
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lcd`` and ``lightning`` commands and of ``python -m lcd``.

    A user error (see :mod:`lcd.errors`) is printed as the last line, ``lcd: error: <message>``, and
    raises :class:`~lcd.errors.UserErrorExit` (exit status 2); ``LCD_DEBUG=1`` keeps the traceback.
    """
    with user_errors("lcd"):
        make_cli(args)


if __name__ == "__main__":
    main()
