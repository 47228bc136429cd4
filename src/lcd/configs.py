"""Where config files are found, and the wiring every lcd config shares.

- ``--config configs/...`` / ``callbacks/...``: a path is read as given when it exists (relative to the
  working directory, as usual); otherwise the copy shipped inside the installed package is used, so ``lcd``
  works outside a checkout (``lcd fit --config configs/synthetic/cpu.yaml`` from any directory).
- Loggers: every run logs to W&B (offline without an account or network) and CSV unless its config sets
  ``trainer.logger`` (the debug fragment sets CSV only), so no fragment has to repeat the logger list.
- Linked sizes: a synthetic task's ``n_dims`` and ``n_pairs`` are written once, on the task; the model's
  network takes them from there.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_LOGGERS", "LINKS", "add_conventions", "find_config", "resolve_config_args", "shipped_root"]

DEFAULT_LOGGERS: list[dict[str, Any]] = [
    {"class_path": "lcd.loggers.WandbLogger", "init_args": {"project": "lcd"}},
    {"class_path": "lcd.loggers.CSVLogger", "init_args": {"name": "csv"}},
]
"""``trainer.logger`` when a config does not set it."""

LINKS: tuple[tuple[str, str], ...] = (
    ("data.init_args.task.init_args.n_dims", "model.init_args.net.init_args.n_dims"),
    ("data.init_args.task.init_args.n_pairs", "model.init_args.net.init_args.n_pairs"),
)
"""(source, target) config keys: the target is set from the source, so a size is written once."""


def shipped_root() -> Path:
    """The folder holding the ``configs/`` and ``callbacks/`` YAML files shipped with the package."""
    return Path(str(files("lcd") / "presets"))


def find_config(path: str | Path) -> Path:
    """``path`` if it exists, else the shipped copy of ``configs/...`` or ``callbacks/...`` if there is one.

    A path that exists nowhere is returned unchanged, so the parser's own "does not exist" error names it.
    """
    given = Path(path)
    if given.exists() or given.is_absolute():
        return given
    shipped = shipped_root() / given
    return shipped if shipped.is_file() else given


def resolve_config_args(args: list[str]) -> list[str]:
    """Command-line arguments with every ``--config``/``-c`` value passed through :func:`find_config`."""
    out: list[str] = []
    take_next = False
    for arg in args:
        if take_next:
            out.append(str(find_config(arg)))
            take_next = False
        elif arg in ("--config", "-c"):
            out.append(arg)
            take_next = True
        elif arg.startswith("--config="):
            out.append("--config=" + str(find_config(arg.split("=", 1)[1])))
        else:
            out.append(arg)
    return out


def add_conventions(parser: Any, default_loggers: bool = True) -> None:
    """Add lcd's shared wiring to a jsonargparse parser with ``model`` and ``data`` (and ``trainer``) groups."""
    for source, target in LINKS:
        parser.link_arguments(source, target)
    if default_loggers:
        parser.set_defaults({"trainer.logger": DEFAULT_LOGGERS})
