"""The ``lcd`` command (also ``lightning`` and ``python -m lcd``): LightningCLI plus lcd's analysis tools.

Usage::

    lcd --help                                                         # every subcommand, one line each
    lcd fit --config configs/trainer/cpu.yaml --config configs/synthetic/cpu.yaml \
        --config callbacks/concept_decodability.yaml                   # the main job (make run)
    lcd fit ... --ckpt_path last                                       # resume an interrupted run
    lcd validate --config configs/llm/probe.yaml --config configs/llm/models/gemma3_270m.yaml \
        --config configs/llm/tasks/pos.yaml                            # probe a pretrained LM
    lcd onsets runs/synthetic_cpu/cd_history.csv                       # analysis tools: lcd <tool> --help
    lcd fit --help                                                     # every option, documented

``fit``, ``validate``, ``test`` and ``predict`` are LightningCLI's; ``onsets``, ``rescore``, ``patch-matrix`` and
``compare`` analyse finished runs (:mod:`lcd.analysis`). ``--config`` paths are found in the working directory
or, failing that, among the configs shipped with the package (:mod:`lcd.configs`).

Conventions added to plain LightningCLI: every logger and the checkpoints live under
``trainer.default_root_dir`` (the run directory) unless set explicitly; runs log to W&B and CSV unless the
config sets ``trainer.logger``; a synthetic task's sizes are linked to its model; a resumed run
(``--ckpt_path``) continues the same W&B run, the same ``csv/version_<n>/metrics.csv`` and the same step axis.

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

import importlib
import re
import sys
import uuid
import warnings
from pathlib import Path
from typing import Any, NoReturn

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lcd.callbacks import ProgressLog
from lcd.configs import add_conventions, resolve_config_args
from lcd.errors import user_errors
from lcd.rundir.guard import Guarded, guard_run, launched_as_rank_zero

__all__ = ["TOOLS", "LCDCLI", "console", "main", "make_cli"]

TOOLS: dict[str, tuple[str, str]] = {
    "onsets": ("lcd.analysis.onsets", "per concept: the step its loss dropped and the step its CD rose, and the lag"),
    "rescore": ("lcd.analysis.rescore", "CD of saved checkpoints at other positions/distances, with a linear probe"),
    "patch-matrix": ("lcd.analysis.patch_matrix", "synthetic mean-activation patching: source x target basis"),
    "compare": ("lcd.analysis.compare", "PAPER.md Table 1: pretrained vs early vs late finetuning vs concept named"),
    "probes": ("lcd.analysis.probes", "finished LLM probes side by side: CD per layer, CD vs accuracy, R², patching"),
}
"""Analysis subcommands: name -> (module with ``main(argv)``, one-line description)."""

_TRAINER_COMMANDS = {
    "fit": "train a model (synthetic pretraining, LoRA/layer finetuning), with CD tracking by callback",
    "validate": "evaluate: the LLM probe (CD per layer, accuracy, R², patching), or a trained run",
    "test": "run the test loop of a model",
    "predict": "run the predict loop of a model",
}
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
    if launched_as_rank_zero():
        root.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id)
    return run_id


def _checkpoint_dir(trainer: Any, root: Path) -> Path:
    """Where the run's ModelCheckpoint writes (its ``dirpath``, else ``<run_dir>/checkpoints``)."""
    for callback in _as_list(trainer.callbacks):
        if _class_name(callback) == "ModelCheckpoint" and callback.init_args.get("dirpath"):
            return Path(callback.init_args.dirpath)
    return root / "checkpoints"


def summarize_parse_error(message: str) -> str:
    """One line out of jsonargparse's nested error message: the option and what is wrong with it."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    key = re.match(r'Parser key "([^"]+)":\s*(.*)', lines[0]) if lines else None
    if key is None:
        return " ".join(lines)
    option, rest = key.group(1), key.group(2)
    unknown = re.findall(r"Option '([^']+)' is not accepted", message)
    if unknown:
        nested = re.search(r"NestedArg\(key='([^']+)'", message)
        classes = re.findall(r"class_path '([^']+)'", message)
        full = f"{option}.init_args.{nested.group(1)}" if nested else f"{option}.{unknown[-1]}"
        owner = f" of {classes[-1]}" if classes else ""
        return f"--{full}: {unknown[-1]!r} is not an option{owner}; --help lists the options."
    skip = ("Given value", "Subtypes", "Errors", "Does not validate", "- Expected a <class 'NoneType'>")
    detail = [line for line in lines[1:] if not line.startswith(skip)]
    return f"--{option}: {rest or (detail[-1] if detail else '')}".rstrip(": ")


class LCDArgumentParser(LightningArgumentParser):
    """LightningCLI's parser whose errors end with one ``lcd: error: <option>: <problem>`` line."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """Print jsonargparse's usage and message, then a one-line summary last; exit with status 2."""
        if not self.exit_on_error:
            super().error(message, ex)
        self.print_usage(sys.stderr)
        sys.stderr.write(f"{message}\nlcd: error: {summarize_parse_error(message)}\n")
        self.exit(2)


class LCDCLI(LightningCLI):
    """LightningCLI that keeps a run's loggers, checkpoints and W&B files in its run directory and guards it.

    See the module docstring for the guards (lock, no fresh fit over an earlier run, intact and safe
    checkpoints), which run right after parsing, before anything is instantiated.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._guarded = Guarded(lock=None, resume_step=None)
        try:
            super().__init__(*args, **kwargs)  # parses, instantiates and runs the subcommand
        finally:
            if self._guarded.lock is not None:
                self._guarded.lock.release()

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add ``--overwrite``, the default loggers and the linked sizes (:mod:`lcd.configs`)."""
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="fit only: start a fresh fit in a run directory that holds an earlier run's outputs, after moving "
            "them (checkpoints/, csv/, wandb/, plots/, cd_history.csv, ...) into <run_dir>/replaced-<date>-<time>/; "
            "nothing is deleted. Without it such a fit is refused (resume it with --ckpt_path last instead).",
        )
        add_conventions(parser)
        parser.add_lightning_class_args(ProgressLog, "progress")  # log lines when output is not a terminal

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then guard the run directory and check the checkpoint to resume from, before any work."""
        with warnings.catch_warnings():
            # lcd always passes LightningCLI the command line it resolved itself (config paths found), so
            # Lightning's warning against passing ``args`` while ``sys.argv`` has arguments does not apply.
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand:
            config = self.config[subcommand]
            root = Path(config.trainer.default_root_dir or "runs/default")
            self._guarded = guard_run(subcommand, config, root, _checkpoint_dir(config.trainer, root))

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
                # A fit's CSV is version_0 (a fresh fit never lands on an earlier run's CSV, see lcd.rundir.guard),
                # so a resume continues it even after validate/test runs added version_1, ...
                if args.get("version") is None:
                    args.version = 0
                args.resume_from_step = self._guarded.resume_step
        for callback in _as_list(trainer.callbacks):
            if _class_name(callback) == "ModelCheckpoint" and not callback.init_args.get("dirpath"):
                callback.init_args.dirpath = str(root / "checkpoints")


def make_cli(args: list[str] | None = None, run: bool = True) -> LCDCLI:
    """Build (and by default run) the lcd LightningCLI.

    Args:
        args: Command-line arguments without the program name; ``None`` reads ``sys.argv``. Tests pass a list.
            ``--config`` paths are resolved by :func:`lcd.configs.find_config`.
        run: Run the subcommand; ``False`` only parses and instantiates.

    """
    return LCDCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=resolve_config_args(sys.argv[1:] if args is None else list(args)),
        run=run,
        parser_class=LCDArgumentParser,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_env": False},
    )


def _print_help() -> None:
    width = max(map(len, [*_TRAINER_COMMANDS, *TOOLS]))
    lines = [
        "usage: lcd <command> [options]     (also: lightning <command>, python -m lcd <command>)",
        "",
        "Train and probe transformers for concept encoding and decoding in in-context learning.",
        "",
        "LightningCLI commands (--config YAML files compose; every option is documented by --help):",
        *(f"  {name:<{width}}  {text}" for name, text in _TRAINER_COMMANDS.items()),
        "",
        "analysis tools:",
        *(f"  {name:<{width}}  {text}" for name, (_, text) in TOOLS.items()),
        "",
        "lcd <command> --help explains every option of a command. Guide: docs/index.md.",
    ]
    print("\n".join(lines))


# Deprecation warnings that the installed libraries raise about each other on every run (Lightning's use of
# torch's pytree API, peft's of a transformers attribute): nothing a user of lcd can act on.
_LIBRARY_DEPRECATIONS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"`is_gradient_checkpointing` is deprecated",
)


def main(args: list[str] | None = None) -> Any:
    """Entry point of the ``lcd`` and ``lightning`` commands and of ``python -m lcd``.

    ``lcd <tool> ...`` runs an analysis tool of :data:`TOOLS` (returning what its ``main`` returns);
    anything else goes to LightningCLI. A user error (see :mod:`lcd.errors`) is printed as the last line,
    ``lcd: error: <message>``, and raises :class:`~lcd.errors.UserErrorExit` (exit status 2);
    ``LCD_DEBUG=1`` keeps the traceback.
    """
    argv = sys.argv[1:] if args is None else list(args)
    for message in _LIBRARY_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message)
    if argv and argv[0] in TOOLS:
        return importlib.import_module(TOOLS[argv[0]][0]).main(argv[1:])
    if not argv or argv[0] in ("-h", "--help"):
        _print_help()
        return None
    with user_errors("lcd"):
        make_cli(argv)
    return None


def console() -> None:
    """The ``lcd`` and ``lightning`` console scripts: :func:`main`, whose return value is for Python callers.

    The exit status is 0, or what a raised ``SystemExit`` carries (2 for a user error).
    """
    main()


if __name__ == "__main__":
    console()
