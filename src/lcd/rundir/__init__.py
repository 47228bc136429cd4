"""Run directories and what lives in them: the lock, the outputs, checkpoints, the CD history."""

from lcd.rundir.checkpoints import (
    CheckpointError,
    UnreadableCheckpointError,
    UnsafeCheckpointError,
    check_checkpoint,
    last_checkpoint,
    load_checkpoint,
    load_run,
    load_weights,
    newest_intact_checkpoint,
)
from lcd.rundir.directory import (
    LOCK_FILE,
    OUTPUTS,
    RunDirectoryError,
    RunLock,
    move_outputs_aside,
    run_dir,
    run_outputs,
)
from lcd.rundir.history import HISTORY_FILE, ONSETS_FILE, history_row, read_history, write_history

__all__ = [
    "HISTORY_FILE",
    "LOCK_FILE",
    "ONSETS_FILE",
    "OUTPUTS",
    "CheckpointError",
    "RunDirectoryError",
    "RunLock",
    "UnreadableCheckpointError",
    "UnsafeCheckpointError",
    "check_checkpoint",
    "history_row",
    "last_checkpoint",
    "load_checkpoint",
    "load_run",
    "load_weights",
    "move_outputs_aside",
    "newest_intact_checkpoint",
    "read_history",
    "run_dir",
    "run_outputs",
    "write_history",
]
