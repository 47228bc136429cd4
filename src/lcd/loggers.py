"""Loggers of lcd runs: W&B (offline by itself without an account or network) and CSV, one row per step.

Both keep a resumed fit (``lcd fit --ckpt_path``) on the same step axis as the run it continues: every
metric of every step once, whether it was logged before the interruption or replayed after it.
"""

from __future__ import annotations

import csv
import netrc
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.utilities.logger import _add_prefix
from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

_HOLD = 2
"""A row is complete once a step this much later is logged. Lightning logs at its step ``b`` (the batches
stepped so far) while callbacks and plots log at ``trainer.global_step``, which is ``b + 1`` in a batch's
end hooks and validation, so values of step ``b`` can follow values of ``b + 1``, never of ``b + 2``."""

_FLUSH_SETTING = "x_transaction_log_flush_interval"  # wandb >= 0.2x; skipped where the setting does not exist
_DIR_VARS = {
    "WANDB_DIR": "",
    "WANDB_CACHE_DIR": "wandb/cache",
    "WANDB_CONFIG_DIR": "wandb/config",
    "WANDB_DATA_DIR": "wandb/data",
}
_OWNED_ENV: dict[str, str] = {}  # variables this module set, with the value it set


def _set_owned_env(var: str, value: str) -> None:
    """Set ``var`` unless the user set it themselves (a value we set earlier may be replaced)."""
    if var not in os.environ or _OWNED_ENV.get(var) == os.environ[var]:
        os.environ[var] = _OWNED_ENV[var] = value


def _wandb_host() -> str:
    return urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"


def _has_credentials(host: str) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _reachable(host: str, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def wandb_mode() -> tuple[str, str]:
    """Decide the W&B mode: ``WANDB_MODE`` if set, else online only with credentials and a network.

    Returns:
        (mode, reason).

    """
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode, f"WANDB_MODE={mode}"
    host = _wandb_host()
    if not _has_credentials(host):
        return "offline", "no W&B credentials (run `wandb login` to sync online)"
    if not _reachable(host):
        return "offline", f"{host} is unreachable"
    return "online", "credentials and network found"


class WandbLogger(_LightningWandbLogger):
    """Lightning's WandbLogger that keeps every W&B file under ``save_dir`` and never hangs offline.

    Without ``WANDB_API_KEY``/``wandb login`` or without a network it logs offline (one log line says
    so); sync later with ``wandb sync <save_dir>/wandb/offline-run-*`` (a resumed run's directories are
    synced in order of start time into the same run). ``WANDB_MODE`` overrides the choice (``online``,
    ``offline``, ``disabled``). W&B's run, cache, config and artifact directories are placed under
    ``save_dir`` unless already set in the environment. ``save_dir`` defaults to the trainer's run
    directory when used through the lcd CLI.

    **Steps.** Lightning's WandbLogger logs each call as its own W&B row, numbered by W&B's counter
    ``_step``, with the trainer's step as the metric ``trainer/global_step``. A resumed run then starts a
    second counter at 0 (offline) and W&B keeps only rows above the run's current ``_step``, so the rows
    of a resumed run go missing. Here (``align_steps``, the default) every row is logged at W&B step =
    the trainer's step (the step Lightning gives the loggers, also kept in ``trainer/global_step``), one
    row per step: the metrics of a step are held until a later step is logged, then committed together
    (the CD callback and plots log at ``trainer.global_step``, one ahead of the step Lightning gives the
    training loss and validation metrics of the same batch; a row is committed once a step two later
    arrives). A resumed fit therefore continues the same step axis: its first row is the
    checkpoint's step, not 0. W&B refuses a row below the run's current step (SDK: "Steps must be
    monotonically increasing, so this data will be ignored"); this logger relies on that rule: the steps
    a resumed fit replays after its checkpoint are those the interrupted run already committed, with the
    same values (resume is exact), so W&B keeps the first copy and the union has every step once. Online,
    the resumed run skips those rows itself (one info line says so); offline, the second directory holds
    them and W&B drops them at ``wandb sync``. Nothing uses W&B's "rewind" (``resume_from``), which is a
    private preview.

    **Kills.** W&B writes committed rows to the run's ``.wandb`` file every
    ``x_transaction_log_flush_interval`` seconds (15 by default), and ``kill -9`` loses what it has not
    written: here the interval is ``flush_interval`` (1 s). The rows of the last two steps are in memory
    until committed: a kill loses them and the resumed fit logs them again (the CD callback re-logs the
    checkpoint's own evaluation), except the training loss and validation metrics of the step that wrote
    the checkpoint, which Lightning logs after the checkpoint and does not replay: a kill within the next
    training step (plus ``flush_interval``) loses those. Online, rows reach the server every
    ``x_file_stream_transmit_interval`` seconds, which this logger leaves as it is.

    Args:
        project: W&B project.
        name: Run name shown in W&B.
        save_dir: Directory for W&B files.
        log_model: Upload checkpoints as W&B artifacts (see Lightning's WandbLogger).
        align_steps: Log at W&B step = the trainer's step, one row per step (see above). The lcd CLI turns
            it off for everything but ``fit`` (``validate``/``test``, whose rows at step 0 or the checkpoint's
            step are appended after the run's last row by W&B's own counter, and ``make_cli(run=False)``).
        flush_interval: Seconds between W&B's writes of the run's ``.wandb`` file (see above); not applied
            when ``settings`` are given.
        **kwargs: Passed to Lightning's WandbLogger and on to ``wandb.init`` (e.g. ``settings``).

    """

    def __init__(
        self,
        project: str = "lcd",
        name: str | None = None,
        save_dir: str = ".",
        log_model: bool | str = False,
        align_steps: bool = True,
        flush_interval: float = 1.0,
        **kwargs: Any,
    ) -> None:
        import wandb

        if kwargs.get("settings") is None and _FLUSH_SETTING in getattr(wandb.Settings, "model_fields", {}):
            kwargs["settings"] = {_FLUSH_SETTING: flush_interval}
        self._align_steps = align_steps
        self._pending: dict[int, dict[str, Any]] = {}  # step -> metrics not yet committed to W&B
        self._skipped_below: int | None = None
        root = Path(save_dir)
        root.mkdir(parents=True, exist_ok=True)
        for var, sub in [
            ("WANDB_DIR", ""),
            ("WANDB_CACHE_DIR", "wandb/cache"),
            ("WANDB_CONFIG_DIR", "wandb/config"),
            ("WANDB_DATA_DIR", "wandb/data"),
        ]:
            os.environ.setdefault(var, str((root / sub).resolve()))
        mode, reason = wandb_mode()
        if kwargs.get("offline"):
            mode, reason = "offline", "offline=True"
        _set_owned_env("WANDB_MODE", mode)  # DDP workers make the same choice without re-probing
        if mode != "online":
            rank_zero_info(f"W&B logging {mode} ({reason}); files under {root.resolve()}")
        kwargs.pop("offline", None)
        super().__init__(
            project=project,
            name=name,
            save_dir=str(root),
            log_model=log_model,
            offline=mode == "offline",
            mode=mode,
            **kwargs,
        )

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log ``metrics`` at ``step``: held until a later step is logged, then committed as one W&B row."""
        if not self._align_steps or step is None:
            super().log_metrics(metrics, step)
            return
        for done in sorted(s for s in self._pending if s <= step - _HOLD):
            self._commit(done)
        self._pending.setdefault(step, {}).update(_add_prefix(dict(metrics), self._prefix, self.LOGGER_JOIN_CHAR))

    def _commit(self, step: int) -> None:
        row = self._pending.pop(step)
        run = self.experiment
        current = getattr(run, "step", 0)
        if step < current:  # W&B would ignore it: a resumed run replays steps the run already has
            if self._skipped_below is None:
                rank_zero_info(
                    f"W&B run {run.id} already has rows up to step {current - 1}: rows below it (replayed by a "
                    "resumed fit) are not sent again."
                )
            self._skipped_below = current
            return
        run.log({**row, "trainer/global_step": step}, step=step, commit=True)

    def _commit_all(self) -> None:
        for step in sorted(self._pending):
            self._commit(step)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """Commit the held rows and finish the W&B run, so the next run in this process gets its own.

        A later ``validate``/``test`` with this logger continues the same run: the id is kept and
        W&B resumes it.
        """
        if self._experiment is not None:
            self._commit_all()
        super().finalize(status)
        if self._experiment is not None:
            self._experiment.finish(exit_code=0 if status == "success" else 1)
            self._experiment = None


class CSVLogger(_LightningCSVLogger):
    """Lightning's CSVLogger with one row per step, which a resumed fit continues in the same file.

    ``<save_dir>/<name>/version_<n>/metrics.csv`` has one row per step holding every metric logged at
    that step (training, validation, CD), in step order; Lightning's own CSVLogger writes one row per
    logging call, so a step can fill several rows. A row is written once a step two later is logged (or
    at the end; see :class:`WandbLogger` for why two), so a kill loses at most the last two steps, which a
    resumed fit replays.

    ``resume_from_step`` (set by ``lcd fit --ckpt_path``: the checkpoint's global step) continues the
    existing ``metrics.csv`` of ``version`` (the lcd CLI gives every fit version 0; unset: the newest
    version) instead of starting a new version: rows past that step, which the resumed fit logs again,
    are dropped, and the row of that step is completed by the resumed fit. ``lcd validate``/``test``
    into a run directory start a new ``version_<n>``.

    Args:
        save_dir: Directory of the CSV files (``<save_dir>/<name>/version_<n>/metrics.csv``); defaults to
            the run directory under the lcd CLI.
        name: Sub-directory name.
        resume_from_step: Continue ``version`` (default: the newest) from this step (see above); ``None``:
            a new version.
        **kwargs: Passed to Lightning's CSVLogger (``version``, ``prefix``, ``flush_logs_every_n_steps``:
            unused, rows are written as soon as they are complete).

    """

    def __init__(self, save_dir: str = ".", name: str = "csv", resume_from_step: int | None = None, **kwargs: Any):
        super().__init__(save_dir=save_dir, name=name, **kwargs)
        self._resume_from_step = resume_from_step
        if resume_from_step is not None and self._version is None:
            latest = self._get_next_version() - 1
            self._version = latest if latest >= 0 else None

    @property
    @rank_zero_experiment
    def experiment(self) -> StepRowWriter:
        """The writer of ``metrics.csv`` (and ``hparams.yaml``)."""
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = StepRowWriter(self.log_dir, self._resume_from_step)
        return self._experiment

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Add ``metrics`` to the row of ``step``; write the rows completed by it."""
        metrics = _add_prefix(dict(metrics), self._prefix, self.LOGGER_JOIN_CHAR)
        self.experiment.log_metrics(metrics, step)
        self.experiment.save()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """Write every row, including the last step's."""
        if self._experiment is not None:
            self._experiment.complete_all()
        super().finalize(status)


class StepRowWriter(ExperimentWriter):
    """Writes ``metrics.csv`` with one row per step (columns sorted by name, as Lightning's).

    Args:
        log_dir: The version directory.
        resume_from_step: Continue an existing ``metrics.csv`` from this step (rows past it are dropped);
            ``None``: start a new file.

    """

    def __init__(self, log_dir: str, resume_from_step: int | None = None) -> None:
        self._resume_from_step = resume_from_step
        self._pending: dict[int, dict[str, Any]] = {}  # rows that a later log call may still add to
        self._ready: dict[int, dict[str, Any]] = {}  # complete rows not yet written
        self._late: dict[int, dict[str, Any]] = {}  # values for rows already in the file
        self._written_through = -1  # every step up to this one is in the file
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        if self._resume_from_step is None or not self._fs.isfile(self.metrics_file_path):
            super()._check_log_dir_exists()  # a new run: Lightning replaces an old metrics.csv (with a warning)
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            merged: dict[int, dict[str, Any]] = {}
            for row in reader:  # files of older lcd versions hold several rows per step: merge them
                values = {k: v for k, v in row.items() if v not in ("", None)}
                merged.setdefault(int(float(values["step"])), {}).update(values)
        cut = self._resume_from_step
        kept = {step: row for step, row in merged.items() if step < cut}
        if cut in merged:
            self._pending[cut] = merged[cut]  # the resumed fit completes this row
        self.metrics_keys = sorted(set(header) | {k for row in merged.values() for k in row})
        self._rewrite(kept)
        self._written_through = max(kept, default=-1)

    def log_metrics(self, metrics_dict: dict[str, Any], step: int | None = None) -> None:
        """Add metrics to the row of ``step``; rows two or more steps earlier are complete from now on."""
        known = [*self._pending, *self._ready, self._written_through]
        if step is None:
            step = max(known) + 1
        values = {k: v.item() if hasattr(v, "item") else v for k, v in metrics_dict.items()}
        for done in [s for s in self._pending if s <= step - _HOLD]:
            self._ready[done] = self._pending.pop(done)
        if step <= self._written_through:
            self._late.setdefault(step, {}).update(values)
        elif step in self._ready:
            self._ready[step].update(values)
        else:
            self._pending.setdefault(step, {"step": step}).update(values)

    def complete_all(self) -> None:
        """Treat every held row as complete (end of the run)."""
        self._ready.update(self._pending)
        self._pending.clear()

    def save(self) -> None:
        """Append the complete rows; rewrite the file when columns are new or a written row gained values."""
        if not self._ready and not self._late:
            return
        rows = [self._ready[step] for step in sorted(self._ready)]
        new_keys = {k for row in [*rows, *self._late.values()] for k in row} - set(self.metrics_keys)
        exists = self._fs.isfile(self.metrics_file_path)
        if new_keys or self._late or not exists:
            self.metrics_keys = sorted(set(self.metrics_keys) | new_keys | {"step"})
            table: dict[int, dict[str, Any]] = {}
            if exists:
                with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                    table = {int(float(r["step"])): r for r in csv.DictReader(f)}
            for step, values in self._late.items():
                table.setdefault(step, {"step": step}).update(values)
            table.update(self._ready)
            self._rewrite(table)
        else:
            with self._fs.open(self.metrics_file_path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.metrics_keys).writerows(rows)
        self._written_through = max(self._written_through, *self._ready, *self._late)
        self._ready.clear()
        self._late.clear()

    def _rewrite(self, table: dict[int, dict[str, Any]]) -> None:
        # Written to a temporary file and renamed, so a kill never leaves half a file.
        tmp = f"{self.metrics_file_path}.tmp"
        with self._fs.open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(table[step] for step in sorted(table))
        os.replace(tmp, self.metrics_file_path)
