"""The finetuning DataModule: :class:`~lcd.text_data.ICLTextDataModule` with a resumable training stream.

The parent serves the ``n_train`` training prompts as one ordinary epoch, which a run resumed from a
mid-epoch checkpoint would restart from its first batch. Here training batch ``i`` is always batch
``i mod n_batches`` of the same seeded prompt order (cycling over the ``n_train`` prompts), exactly as
the synthetic :class:`~lcd.data.SyntheticICLDataModule` streams: a run resumed at optimizer step ``s``
continues with batch ``s * accumulate_grad_batches * world_size``, and under DDP rank ``r`` of ``w``
takes batches ``r, r + w, ...``. Training length is set by ``trainer.max_steps``
(``n_train / batch_size`` steps is one pass over the prompts).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

from torch.utils.data import DataLoader, IterableDataset

from lcd.data import consumed_batches
from lcd.tasks.prompts import ICLPrompt
from lcd.text_data import ICLTextDataModule, encode_prompts

__all__ = ["FinetuneDataModule"]


class _PromptBatchStream(IterableDataset):
    """Infinite stream of collated batches ``start, start + step, ...`` cycling over ``prompts``."""

    def __init__(
        self, prompts: Sequence[ICLPrompt], batch_size: int, collate: Callable[[list], Any], start: int, step: int
    ) -> None:
        self.prompts, self.batch_size, self.collate, self.start, self.step = prompts, batch_size, collate, start, step
        self.n_batches = math.ceil(len(prompts) / batch_size)

    def __iter__(self) -> Iterator[Any]:
        index = self.start
        while True:
            b = index % self.n_batches
            yield self.collate(list(self.prompts[b * self.batch_size : (b + 1) * self.batch_size]))
            index += self.step


class FinetuneDataModule(ICLTextDataModule):
    """k-shot prompts for finetuning, with a training stream that resumes mid-pass (see the module docstring).

    Arguments are those of :class:`~lcd.text_data.ICLTextDataModule`.
    """

    def train_dataloader(self) -> DataLoader:
        """Prompt+answer batches cycling over the training prompts, starting where a resumed run stopped."""
        if self.tokenizer is None:
            raise RuntimeError("no tokenizer yet: call set_tokenizer(model_tokenizer) first.")
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        collate = partial(encode_prompts, self.tokenizer, with_answers=True, max_length=self.max_length)
        stream = _PromptBatchStream(
            self.train_prompts(), self.batch_size, collate, consumed_batches(self.trainer) + rank, world
        )
        return DataLoader(stream, batch_size=None)
