"""Run directories: one run per directory, guarded by a lock; what a run leaves there.

A run directory (``trainer.default_root_dir``) belongs to one run: :class:`RunLock` keeps a second process
out while a run uses it, and :func:`run_outputs` lists what an earlier run left there, so that a fresh
``lcd fit`` refuses to replace it (see :mod:`lcd.cli`).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import time
from pathlib import Path

import lightning as L

LOCK_FILE = ".lock"
OUTPUTS = (
    "checkpoints",
    "csv",
    "wandb",
    "plots",
    "cd_history.csv",
    "cd_onsets.txt",
    "adapter",
    "merged",
    "cd_checkpoints",
    "lightning_logs",
    "wandb_run_id.txt",
    "config.yaml",
)
"""Names an lcd run writes in its run directory (moved aside together by :func:`move_outputs_aside`)."""


class RunDirectoryError(ValueError):
    """A run directory that this command must not use (in use, or holding another run's outputs)."""


def run_dir(trainer: L.Trainer) -> Path:
    """The run directory: ``trainer.default_root_dir``, where CSVs, plots and checkpoints land."""
    return Path(trainer.default_root_dir)


def run_outputs(root: str | Path) -> list[str]:
    """What an earlier run left in ``root`` that a fresh run would replace (names relative to ``root``).

    Counted: checkpoint files, ``cd_history.csv``, CSV metrics, W&B run directories, plots, a saved adapter
    or merged model. A ``config.yaml`` or W&B id alone (left by a run that failed before it logged anything)
    is not a run's output.
    """
    root = Path(root)
    found = [
        *(f"checkpoints/{p.name}" for p in sorted((root / "checkpoints").glob("*.ckpt"))),
        *(name for name in ("cd_history.csv", "cd_onsets.txt") if (root / name).is_file()),
        *(str(p.relative_to(root)) for p in sorted((root / "csv").glob("*/metrics.csv"))),
        *(str(p.relative_to(root)) for p in sorted((root / "wandb").glob("*run-*")) if p.is_dir()),
        *(f"plots/{p.name}" for p in sorted((root / "plots").glob("*.png"))),
        *(name for name in ("adapter", "merged", "lightning_logs") if (root / name).exists()),
    ]
    return found


def move_outputs_aside(root: str | Path) -> Path | None:
    """Move every lcd output in ``root`` (:data:`OUTPUTS`) into ``root/replaced-<date>-<time>/``.

    Nothing is deleted; other files in ``root`` stay where they are.

    Returns:
        The directory the outputs went to, or ``None`` when there was nothing to move.

    """
    root = Path(root)
    present = [name for name in OUTPUTS if (root / name).exists()]
    if not present:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = root / f"replaced-{stamp}"
    n = 1
    while aside.exists():
        n += 1
        aside = root / f"replaced-{stamp}-{n}"
    aside.mkdir()
    for name in present:
        shutil.move(str(root / name), str(aside / name))
    return aside


class RunLock:
    """An exclusive lock on a run directory, held by one process (``fcntl.flock`` on ``<root>/.lock``).

    The operating system releases it when the process exits, however it exits (also on ``kill -9``), so a
    stale lock never blocks a later run. The lock file records who holds it. A directory that the lock
    created and that holds nothing else when it is released (a command that failed before writing
    anything) is removed again.

    Args:
        root: The run directory (created if missing).

    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._fd: int | None = None
        self._created = False

    def acquire(self) -> None:
        """Take the lock.

        Raises:
            RunDirectoryError: if another process holds it (the message names that process).

        """
        self._created = not self.root.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirectoryError(
                f"{self.root} is in use by another process ({holder}); wait for it to finish, or choose another "
                "--trainer.default_root_dir."
            ) from None
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        os.pwrite(fd, f"PID {os.getpid()} on {socket.gethostname()}, started {started}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Release the lock (the lock file stays, empty of meaning until the next holder writes it)."""
        if self._fd is None:
            return
        if self._created and [p.name for p in self.root.iterdir()] == [LOCK_FILE]:
            (self.root / LOCK_FILE).unlink()
            self.root.rmdir()
        os.close(self._fd)  # closing the descriptor drops the flock
        self._fd = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None
