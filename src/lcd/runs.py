"""Rebuild a finished run from its directory: the saved ``config.yaml`` and a checkpoint's weights."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import yaml


def load_weights(model: L.LightningModule, ckpt: str | Path) -> int:
    """Load a Lightning checkpoint's ``state_dict`` into ``model``; returns the checkpoint's ``global_step``.

    Raises:
        FileNotFoundError: if the checkpoint does not exist.

    """
    if not Path(ckpt).is_file():
        raise FileNotFoundError(f"{ckpt} does not exist.")
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    model.load_state_dict(saved["state_dict"])
    return int(saved.get("global_step", -1))


def load_run(config: str | Path, ckpt: str | Path | None) -> tuple[L.LightningModule, L.LightningDataModule]:
    """Instantiate the run's model and datamodule from its saved config; load the checkpoint's weights.

    Raises:
        FileNotFoundError: if the config or checkpoint does not exist.

    """
    from jsonargparse import ArgumentParser

    for path in (config, ckpt):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{path} does not exist.")
    saved = yaml.safe_load(Path(config).read_text())
    parser = ArgumentParser()
    parser.add_argument("--model", type=L.LightningModule)
    parser.add_argument("--data", type=L.LightningDataModule)
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # jsonargparse < 4.49
    objs = instantiate(parser.parse_object({"model": saved["model"], "data": saved["data"]}))
    model, data = objs.model, objs.data
    if ckpt is not None:
        load_weights(model, ckpt)
    return model.eval(), data
