"""Shared test setup: offline W&B, small thread count, tiny configs, the real models loaded once per session."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
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


# --- the real models, prepared in a second process while the other tests run (slow tests only) -----------

PREFETCH_FIXTURES = {"real_models", "gemma_bitwise_probe"}
GEMMA_PROBE = [
    "validate",
    *config("configs/llm/probe.yaml", "configs/llm/models/gemma3_270m.yaml", "configs/llm/tasks/bitwise.yaml"),
    *config("configs/debug.yaml", "configs/llm/debug.yaml"),
    "--data.init_args.eval_shots=[4]",
    "--data.init_args.n_per_concept=15",
    "--model.init_args.k=10",
    "--model.init_args.generate=false",  # no test of the real model asserts on its answers
]


class Prefetch:
    """``tests/prefetch_models.py`` in a process of its own: real-model work off the critical path.

    The tests run in one process with one thread, so a 2-core machine has a core to spare: the first load of
    each real model (in a fresh cache it dequantizes the GGUF: minutes) and the Gemma probe's forward pass run
    there, while the other tests run here; the tests that use them run last.
    """

    def __init__(self) -> None:
        self.out = Path(tempfile.mkdtemp(prefix="lcd-real-models-"))
        self.log = open(self.out / "log.txt", "w")  # noqa: SIM115 (closed in stop)
        script = Path(__file__).with_name("prefetch_models.py")
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(self.out)], cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT
        )

    def result(self) -> Path:
        """Wait for the process; its output directory."""
        if self.proc.wait() != 0 or not (self.out / "done").exists():
            log = (self.out / "log.txt").read_text()[-5000:]
            raise RuntimeError(f"tests/prefetch_models.py failed (exit {self.proc.returncode}):\n{log}")
        return self.out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.out, ignore_errors=True)


_prefetch: Prefetch | None = None


@pytest.hookimpl(trylast=True)  # after -m / -k deselection
def pytest_collection_modifyitems(session, config, items):
    """Move the tests of the real models to the end, and start preparing the models for them now."""
    global _prefetch
    real = [item for item in items if PREFETCH_FIXTURES & set(getattr(item, "fixturenames", ()))]
    if real and not config.option.collectonly:
        items[:] = [item for item in items if item not in real] + real
        _prefetch = _prefetch or Prefetch()


def pytest_sessionfinish(session, exitstatus):
    if _prefetch is not None:
        _prefetch.stop()


@pytest.fixture(scope="session")
def real_models() -> Path:
    """Gemma 3 270M and SmolLM2-135M are in the lcd cache; the directory of tests/prefetch_models.py's outputs."""
    global _prefetch
    _prefetch = _prefetch or Prefetch()
    return _prefetch.result()


@pytest.fixture(scope="session")
def gemma_bitwise_probe(real_models):
    """``lcd validate`` of the Gemma probe YAMLs (``GEMMA_PROBE``) on 105 bitwise prompts (7 classes x 15, Null
    included, 4 shots): its run directory, and the features (18, 105, 640) and labels (105,) the probe computed
    CD from, so that the probe's test and the exact-CD test share one forward pass of the prompts."""
    import torch

    saved = torch.load(real_models / "gemma_probe.pt", weights_only=True)
    return real_models / "gemma_probe", saved["features"], saved["labels"]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def lightning_log():
    """The messages logged through Lightning's logger (``rank_zero_info``/``rank_zero_warn``) during a test."""
    logger, handler = logging.getLogger("lightning.pytorch"), _Records()  # where rank_zero_info goes
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
