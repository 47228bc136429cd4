"""DataModules for synthetic ICL tasks: seeded, streaming, resumable, DDP-aware; no I/O in ``__init__``.

Training batch number ``i`` is generated from its own generator seeded with ``(seed, i)``, so the
stream is a pure function of the seed: a run resumed from a checkpoint at step s continues with batch
``s * accumulate_grad_batches`` exactly as the uninterrupted run would, and under DDP rank r of w
processes takes batches ``r, r + w, r + 2w, ...``.
"""

from __future__ import annotations

from collections.abc import Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from lcd.curriculum import Curriculum
from lcd.tasks.base import ICLTask

_VAL_STREAM, _PROBE_STREAM = 1, 2  # separate seed streams: validation and probe sets never overlap training


def _generator(seed: int, stream: int, index: int) -> torch.Generator:
    # One independent generator per (seed, stream, batch index); the odd multipliers decorrelate them.
    return torch.Generator().manual_seed((seed * 1_000_003 + stream * 7_919 + index) % (2**63 - 1))


def consumed_batches(trainer: L.Trainer | None) -> int:
    """Training batches a resumed run has consumed, over all processes (0 without a trainer).

    Lightning checkpoints at optimizer-step boundaries, so this is
    ``global_step * accumulate_grad_batches * world_size``.
    """
    if trainer is None:
        return 0
    return trainer.global_step * trainer.accumulate_grad_batches * trainer.world_size


class _TaskStream(IterableDataset):
    """Infinite stream of whole batches ``start, start + step, ...`` (the DataLoader must not re-batch)."""

    def __init__(
        self, task: ICLTask, batch_size: int, seed: int, start: int, step: int, curriculum: Curriculum | None = None
    ) -> None:
        self.task, self.batch_size, self.seed, self.start, self.step = task, batch_size, seed, start, step
        self.curriculum = curriculum

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        index = self.start
        while True:
            generator = _generator(self.seed, 0, index)
            if self.curriculum is None:
                yield self.task.sample(self.batch_size, generator)
            else:
                yield self.curriculum.sample(self.task, self.batch_size, generator, index)
            index += self.step


def fixed_batches(
    task: ICLTask, n_per_concept: int, seed: int, stream: int, batch_size: int
) -> list[dict[str, torch.Tensor]]:
    """A fixed, seeded, concept-balanced set of prompts split into batches."""
    concepts = task.balanced_concepts(n_per_concept)
    full = task.sample(len(concepts), _generator(seed, stream, 0), concept=concepts)
    return [{key: v[i : i + batch_size] for key, v in full.items()} for i in range(0, len(concepts), batch_size)]


class SyntheticICLDataModule(L.LightningDataModule):
    """Streams prompts of a synthetic ICL task; fixed seeded validation and probe sets.

    Args:
        task: The task (``class_path`` of an :class:`~lcd.tasks.base.ICLTask`).
        batch_size: Training prompts per step (per process under DDP).
        seed: Seed of the training stream and of the validation and probe sets.
        val_per_concept: Validation prompts per concept.
        probe_per_concept: Prompts per concept in the probe set used for Concept Decodability.
        eval_batch_size: Batch size of the validation and probe sets.
        curriculum: Optional training curriculum, e.g. :class:`~lcd.curriculum.ConceptCurriculum`; a
            function of the batch index, so the stream stays seeded and resumable. Validation and
            probe sets always use the full task.

    """

    def __init__(
        self,
        task: ICLTask,
        batch_size: int = 64,
        seed: int = 0,
        val_per_concept: int = 128,
        probe_per_concept: int = 100,
        eval_batch_size: int = 256,
        curriculum: Curriculum | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError("batch_size and eval_batch_size must be >= 1.")
        if val_per_concept < 1 or probe_per_concept < 1:
            raise ValueError("val_per_concept and probe_per_concept must be >= 1.")
        self.task, self.batch_size, self.seed = task, batch_size, seed
        self.val_per_concept, self.probe_per_concept = val_per_concept, probe_per_concept
        self.eval_batch_size = eval_batch_size
        self.curriculum = curriculum

    @property
    def n_dims(self) -> int:
        """Input dimension of the task."""
        return self.task.n_dims

    @property
    def n_pairs(self) -> int:
        """In-context pairs per prompt."""
        return self.task.n_pairs

    @property
    def concept_names(self) -> list[str]:
        """Names of the latent concepts."""
        return self.task.concept_names

    def train_dataloader(self) -> DataLoader:
        """The infinite training stream; set ``trainer.max_steps`` to end training."""
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        start = consumed_batches(self.trainer) + rank
        stream = _TaskStream(self.task, self.batch_size, self.seed, start, world, self.curriculum)
        return DataLoader(stream, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        """The fixed, concept-balanced validation set."""
        return self._fixed_loader(self.val_per_concept, _VAL_STREAM)

    def probe_dataloader(self, n_per_concept: int | None = None) -> DataLoader:
        """The fixed, concept-balanced probe set for Concept Decodability (same on every process)."""
        return self._fixed_loader(n_per_concept or self.probe_per_concept, _PROBE_STREAM)

    def _fixed_loader(self, n_per_concept: int, stream: int) -> DataLoader:
        batches = fixed_batches(self.task, n_per_concept, self.seed, stream, self.eval_batch_size)
        return DataLoader(batches, batch_size=None)
