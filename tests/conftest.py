"""Shared test setup: offline W&B, small thread count, tiny configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One intra-op thread per process: tests start several processes (DDP, CLI subprocesses) on 2 cores, and
# oversubscribed OpenMP threads spin-wait each other (a 7x slowdown was measured here).
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "configs/debug.yaml")


def config(*parts: str) -> list[str]:
    """``--config`` arguments for YAML files given relative to the repository root."""
    args: list[str] = []
    for part in parts:
        args += ["--config", str(ROOT / part)]
    return args


TINY_SYNTHETIC = [
    "--model.init_args.net.init_args.n_layers=2",
    "--model.init_args.net.init_args.d_model=16",
    "--model.init_args.net.init_args.n_heads=2",
    "--data.init_args.val_per_concept=8",
    "--data.init_args.probe_per_concept=12",
    "--data.init_args.batch_size=8",
    "--model.init_args.compile=false",  # compiling costs ~20 s per run; test_cli's preset test keeps it on
]


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A fresh run directory."""
    return tmp_path / "run"
