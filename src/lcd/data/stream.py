"""The one seeded, resumable training stream shared by every DataModule.

Training batch number ``i`` is a pure function of ``i`` (``make_batch(i)``), so the stream needs no state
of its own: a run resumed from a checkpoint at optimizer step ``s`` continues with batch
``s * accumulate_grad_batches * world_size`` exactly as the uninterrupted run would, and under DDP rank
``r`` of ``w`` processes takes batches ``r, r + w, r + 2w, ...``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

__all__ = ["BatchStream", "batch_generator", "consumed_batches", "stream_loader"]


def batch_generator(seed: int, stream: int, index: int) -> torch.Generator:
    """An independent generator per (seed, stream, batch index); the odd multipliers decorrelate them."""
    return torch.Generator().manual_seed((seed * 1_000_003 + stream * 7_919 + index) % (2**63 - 1))


def consumed_batches(trainer: L.Trainer | None) -> int:
    """Training batches a resumed run has consumed, over all processes (0 without a trainer).

    Lightning checkpoints at optimizer-step boundaries, so this is
    ``global_step * accumulate_grad_batches * world_size``.
    """
    if trainer is None:
        return 0
    return trainer.global_step * trainer.accumulate_grad_batches * trainer.world_size


class BatchStream(IterableDataset):
    """Infinite stream of whole batches ``make_batch(start), make_batch(start + step), ...``.

    Args:
        make_batch: Batch number ``i`` -> the batch (already collated: the DataLoader must not re-batch).
        start: First batch index.
        step: Index stride (the number of processes).

    """

    def __init__(self, make_batch: Callable[[int], Any], start: int = 0, step: int = 1) -> None:
        self.make_batch, self.start, self.step = make_batch, start, step

    def __iter__(self) -> Iterator[Any]:
        index = self.start
        while True:
            yield self.make_batch(index)
            index += self.step


def stream_loader(make_batch: Callable[[int], Any], trainer: L.Trainer | None) -> DataLoader:
    """A DataLoader over :class:`BatchStream` that starts where ``trainer`` (resumed or not, DDP or not) is."""
    rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
    return DataLoader(BatchStream(make_batch, consumed_batches(trainer) + rank, world), batch_size=None)
