"""Learning-rate schedules usable from LightningCLI's ``lr_scheduler:`` with a plain ``class_path``.

torch's warm-up-then-decay needs ``SequentialLR`` over scheduler objects, which YAML cannot build; this
module gives the same thing as one class. :class:`~lcd.lit.pretrain.LitPretrain` steps the scheduler
after every optimizer step (the training stream is infinite, so an epoch never ends).
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


class WarmupCosineLR(LRScheduler):
    """Linear warm-up to the optimizer's lr, cosine decay to a floor, then constant at the floor.

    The factor applied to each parameter group's lr at optimizer step ``s`` is ``(s + 1) / warmup_steps``
    during warm-up, then ``min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * t)) / 2`` with ``t`` going
    from 0 to 1 between ``warmup_steps`` and ``total_steps``, and ``min_lr_ratio`` after ``total_steps``
    (so training past ``total_steps`` is allowed, unlike ``OneCycleLR``).

    Args:
        optimizer: The optimizer (LightningCLI passes it).
        warmup_steps: Optimizer steps of linear warm-up; 0 starts at the full lr.
        total_steps: Optimizer step at which the decay reaches its floor; set it to ``trainer.max_steps``.
        min_lr_ratio: Final lr as a fraction of the optimizer's lr.
        last_epoch: Index of the last step taken (``-1`` for a fresh start; resuming restores it from the
            checkpoint).

    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int = 0,
        total_steps: int = 10_000,
        min_lr_ratio: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}.")
        if total_steps <= warmup_steps:
            raise ValueError(f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps}).")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}.")
        self.warmup_steps, self.total_steps, self.min_lr_ratio = warmup_steps, total_steps, min_lr_ratio
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        """The lr multiplier at optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        t = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))

    def get_lr(self) -> list[float]:
        """The lr of every parameter group at the current step."""
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]
