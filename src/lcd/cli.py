"""The ``lcd`` (and ``lightning``) command: LightningCLI with lcd's run-directory conventions.

Usage::

    lcd fit --config configs/synthetic/cpu.yaml
    lcd fit --config configs/synthetic/cpu.yaml --config callbacks/concept_decodability.yaml
    lcd fit --config configs/synthetic/cpu.yaml --ckpt_path last      # resume an interrupted run
    lcd fit --help                                                     # every option, documented

Conventions added to plain LightningCLI: every logger and the checkpoints live under
``trainer.default_root_dir`` (the run directory) unless set explicitly, and a resumed run (``--ckpt_path``)
continues the same W&B run.

A setting or input that cannot work (an impossible option, a layer out of range, a missing or unreadable
file, a model that is not installed) ends the command with ``lcd: error: <what to fix>`` as the last line
on stderr and exit status 2; ``LCD_DEBUG=1`` shows its traceback (see :mod:`lcd.errors`).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningCLI

from lcd.errors import user_errors

_WANDB_ID_FILE = "wandb_run_id.txt"


def _class_name(node: Any) -> str:
    path = node.get("class_path", "") if hasattr(node, "get") else ""
    return str(path).rsplit(".", 1)[-1]


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _wandb_run_id(root: Path, resuming: bool) -> str:
    """The W&B run id of this run directory: the saved one when resuming, else a new one (saved)."""
    id_file = root / _WANDB_ID_FILE
    if resuming and id_file.exists():
        return id_file.read_text().strip()
    run_id = uuid.uuid4().hex[:8]
    if os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0":
        root.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id)
    return run_id


class LCDCLI(LightningCLI):
    """LightningCLI that keeps a run's loggers, checkpoints and W&B files in its run directory."""

    def before_instantiate_classes(self) -> None:
        """Point loggers and checkpoints at the run directory; reuse the W&B run id on resume."""
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
