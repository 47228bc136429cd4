"""Checkpoints: loaded safely (``weights_only=True``), checked for truncation, and finished runs rebuilt.

Checkpoints are loaded only with ``torch.load(weights_only=True)``, which unpickles tensors and plain data
(dicts, lists, numbers, strings) and refuses anything else, so a crafted file cannot run code when it is
loaded; lcd's own checkpoints (weights, optimizer state, loop counters, callback states such as the CD
history, hyperparameters saved by LightningCLI) contain only such data. A checkpoint is also checked for
truncation and corruption before a resume starts (:func:`check_checkpoint`).
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml

_LAST = re.compile(r"^last(-v?\d+)?\.ckpt$")  # Lightning's last.ckpt, last-v1.ckpt


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unsafe to load, truncated or otherwise unreadable."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose pickle holds objects other than tensors and plain data (it would run code)."""


class UnreadableCheckpointError(CheckpointError):
    """A truncated, corrupted or non-checkpoint file."""


def load_checkpoint(ckpt: str | Path) -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)`` onto the CPU.

    Raises:
        FileNotFoundError: if the file does not exist.
        UnsafeCheckpointError: if the pickle holds anything but tensors and plain data (nothing of it ran).
        UnreadableCheckpointError: if the file is truncated, corrupted or not a PyTorch checkpoint.

    """
    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err):
            raise UnsafeCheckpointError(
                f"{path} was refused: it holds objects other than tensors and plain data, and loading it would "
                f"run code it contains ({_refused_global(err)}; lcd loads checkpoints only with "
                "torch.load(weights_only=True))."
            ) from None
        raise UnreadableCheckpointError(f"{path} is truncated or unreadable ({_reason(err)}).") from err
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
        raise UnreadableCheckpointError(f"{path} is truncated or unreadable ({_reason(err)}).") from err


def _refused_global(err: Exception) -> str:
    found = re.search(r"GLOBAL ([\w.]+)", str(err))  # torch names the class or function the pickle wanted
    return f"it wanted {found.group(1)}" if found else str(err).strip().splitlines()[-1]


def _reason(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def check_checkpoint(ckpt: str | Path) -> dict[str, Any]:
    """Verify that a checkpoint is complete and safe, and return its contents.

    PyTorch checkpoints are zip archives: a truncated file has no central directory, and a corrupted one
    fails the CRC of one of its members (``torch.load`` alone does not check CRCs). The contents are then
    loaded as by :func:`load_checkpoint`.

    Raises:
        FileNotFoundError: if the file does not exist.
        UnsafeCheckpointError: see :func:`load_checkpoint`.
        UnreadableCheckpointError: if the file is truncated, corrupted or not a PyTorch checkpoint.

    """
    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    if zipfile.is_zipfile(path):  # every checkpoint torch.save writes; older formats go straight to torch.load
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise UnreadableCheckpointError(f"{path} is truncated or unreadable ({_reason(err)}).") from err
        if bad is not None:
            raise UnreadableCheckpointError(f"{path} is corrupted (archive member {bad} fails its CRC check).")
    else:
        with path.open("rb") as f:
            if f.read(2) == b"PK":  # a zip archive whose end (the central directory) is missing
                raise UnreadableCheckpointError(f"{path} is truncated or unreadable (an incomplete zip archive).")
    return load_checkpoint(path)


def last_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The newest ``last*.ckpt`` in ``ckpt_dir``, as Lightning resolves ``ckpt_path="last"``; ``None`` if none."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    candidates = [p for p in ckpt_dir.iterdir() if p.is_file() and _LAST.match(p.name)]
    return max(candidates, key=lambda p: p.stat().st_mtime, default=None)


def newest_intact_checkpoint(ckpt_dir: str | Path, skip: str | Path | None = None) -> tuple[Path, int] | None:
    """The newest (by modification time) checkpoint in ``ckpt_dir`` that passes :func:`check_checkpoint`.

    Args:
        ckpt_dir: Directory of ``*.ckpt`` files.
        skip: A file not to consider (the one already found broken).

    Returns:
        (path, global step), or ``None`` when no checkpoint there is intact.

    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    skipped = Path(skip).resolve() if skip is not None else None
    files = [p for p in ckpt_dir.glob("*.ckpt") if p.is_file() and p.resolve() != skipped]
    for path in sorted(files, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            saved = check_checkpoint(path)
        except CheckpointError:
            continue
        return path, int(saved.get("global_step", -1))
    return None


def load_weights(model: L.LightningModule, ckpt: str | Path) -> int:
    """Load a Lightning checkpoint's ``state_dict`` into ``model``; returns the checkpoint's ``global_step``.

    Raises:
        FileNotFoundError: if the checkpoint does not exist.
        CheckpointError: if it is unsafe to load or unreadable (see :func:`load_checkpoint`).

    """
    saved = load_checkpoint(ckpt)
    model.load_state_dict(saved["state_dict"])
    return int(saved.get("global_step", -1))


def load_run(config: str | Path, ckpt: str | Path | None) -> tuple[L.LightningModule, L.LightningDataModule]:
    """Instantiate the run's model and datamodule from its saved config; load the checkpoint's weights.

    Raises:
        FileNotFoundError: if the config or checkpoint does not exist.
        CheckpointError: if the checkpoint is unsafe to load or unreadable.

    """
    from jsonargparse import ArgumentParser

    for path in (config, ckpt):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{path} does not exist.")
    saved = yaml.safe_load(Path(config).read_text())
    from lcd.configs import add_conventions

    parser = ArgumentParser()
    parser.add_argument("--model", type=L.LightningModule)
    parser.add_argument("--data", type=L.LightningDataModule)
    add_conventions(parser, default_loggers=False)  # the links the run was built with (config.yaml omits them)
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # jsonargparse < 4.49
    objs = instantiate(parser.parse_object({"model": saved["model"], "data": saved["data"]}))
    model, data = objs.model, objs.data
    if ckpt is not None:
        load_weights(model, ckpt)
    return model.eval(), data
