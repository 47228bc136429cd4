"""Progress as log lines for runs whose output is not a terminal (a job's log file, ``nohup``, a scheduler)."""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from lcd.lit.probe_report import duration


class ProgressLog(L.Callback):
    """A line every ``every_s`` seconds of ``fit``: step, seconds per step, train loss, elapsed, time left.

    Lightning's progress bar draws nothing into a file until the run ends, so a finetuning job of half an
    hour written to a log stays silent. This callback fills that gap: when standard output is not a terminal
    (or the trainer has no progress bar) it logs, through Lightning's logger on global rank 0::

        fit | step 9/12 | 7.63 s/step | train/loss 2.759 | elapsed 1m09s | left ~0m23s
        fit | validation at step 12 | batch 4/9 | elapsed 0m16s

    Time left is the steps still to take at the pace of this session so far (CD evaluations and validation
    included). ``lcd validate`` (the probe) logs its own progress, so only fit's loops are reported. The
    ``lcd`` command adds this callback to every run; set ``--progress.every_s null`` to turn it off.

    Args:
        every_s: Seconds between lines (the first line comes after the first step); ``null`` for none.

    """

    def __init__(self, every_s: float | None = 60.0) -> None:
        if every_s is not None and every_s < 0:
            raise ValueError(f"progress every_s must be >= 0 seconds (or null for no lines), got {every_s}.")
        self.every_s = every_s
        self._start = self._last = 0.0
        self._first_step = 0
        self._val_start = 0.0

    def _on(self, trainer: L.Trainer) -> bool:
        return self.every_s is not None and (trainer.progress_bar_callback is None or not sys.stdout.isatty())

    def _due(self) -> bool:
        now = time.monotonic()
        if self._last and now - self._last < self.every_s:
            return False
        self._last = now
        return True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start the clock (after a resume, at the restored step)."""
        self._start, self._last, self._first_step = time.monotonic(), 0.0, trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        """Log a line when one is due."""
        if not self._on(trainer) or not self._due():
            return
        step, total = trainer.global_step, trainer.max_steps
        if total is None or total < 0:
            total = int(trainer.estimated_stepping_batches)
        elapsed = time.monotonic() - self._start
        per_step = elapsed / max(step - self._first_step, 1)
        loss = trainer.callback_metrics.get("train/loss")
        loss_text = "" if loss is None else f" | train/loss {float(loss):.4g}"
        rank_zero_info(
            f"fit | step {step}/{total} | {per_step:.2f} s/step{loss_text} | elapsed {duration(elapsed)}"
            f" | left ~{duration(per_step * max(total - step, 0))}"
        )

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start the validation clock."""
        self._val_start = time.monotonic()

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """During fit, log validation progress when a line is due (the probe reports its own)."""
        if trainer.state.fn != "fit" or trainer.sanity_checking or not self._on(trainer) or not self._due():
            return
        total = sum(trainer.num_val_batches)
        done = sum(trainer.num_val_batches[:dataloader_idx]) + batch_idx + 1
        rank_zero_info(
            f"fit | validation at step {trainer.global_step} | batch {done}/{total}"
            f" | elapsed {duration(time.monotonic() - self._val_start)}"
        )
