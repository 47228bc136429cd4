"""A callback that kills its own process with SIGKILL at a chosen step, as ``kill -9`` would (for resume tests)."""

import os
import signal
import time

import lightning as L


class KillAt(L.Callback):
    """SIGKILL this process in ``on_train_batch_end`` once the trainer reaches ``step``.

    Args:
        step: Global step at which to die (after that step's callbacks that run before this one, e.g. the
            ConceptDecodability callback listed earlier; checkpoint callbacks run after all others).
        wait: Seconds to wait first, as a kill arriving a while after the last log would (W&B writes its
            run file at intervals).

    """

    def __init__(self, step: int, wait: float = 0.0) -> None:
        self.step, self.wait = step, wait

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        """Die at ``step``."""
        if trainer.global_step == self.step:
            time.sleep(self.wait)
            os.kill(os.getpid(), signal.SIGKILL)
