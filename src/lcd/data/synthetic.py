"""The DataModule of synthetic ICL tasks: seeded, streaming, resumable, DDP-aware; no I/O in ``__init__``.

Training batch number ``i`` is generated from its own generator seeded with ``(seed, i)`` and served by
the shared :mod:`lcd.data.stream`, so a resumed or DDP run sees exactly the batches of one uninterrupted
process.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

from lcd.data.stream import batch_generator, stream_loader
from lcd.tasks.synthetic.base import ICLTask
from lcd.tasks.synthetic.curriculum import Curriculum

_VAL_STREAM, _PROBE_STREAM = 1, 2  # separate seed streams: validation and probe sets never overlap training


def fixed_batches(
    task: ICLTask, n_per_concept: int, seed: int, stream: int, batch_size: int
) -> list[dict[str, torch.Tensor]]:
    """A fixed, seeded, concept-balanced set of prompts split into batches."""
    concepts = task.balanced_concepts(n_per_concept)
    full = task.sample(len(concepts), batch_generator(seed, stream, 0), concept=concepts)
    return [{key: v[i : i + batch_size] for key, v in full.items()} for i in range(0, len(concepts), batch_size)]


class SyntheticICLDataModule(L.LightningDataModule):
    """Streams prompts of a synthetic ICL task; fixed seeded validation and probe sets.

    Args:
        task: The task (``class_path`` of an :class:`~lcd.tasks.synthetic.base.ICLTask`).
        batch_size: Training prompts per step (per process under DDP).
        seed: Seed of the training stream and of the validation and probe sets.
        val_per_concept: Validation prompts per concept.
        probe_per_concept: Prompts per concept in the probe set used for Concept Decodability.
        eval_batch_size: Batch size of the validation and probe sets.
        curriculum: Optional training curriculum, e.g. :class:`~lcd.tasks.synthetic.curriculum.ConceptCurriculum`; a
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
        return stream_loader(self.training_batch, self.trainer)

    def training_batch(self, index: int) -> dict[str, torch.Tensor]:
        """Training batch number ``index`` of the stream (a pure function of the seed and ``index``)."""
        generator = batch_generator(self.seed, 0, index)
        if self.curriculum is None:
            return self.task.sample(self.batch_size, generator)
        return self.curriculum.sample(self.task, self.batch_size, generator, index)

    def val_dataloader(self) -> DataLoader:
        """The fixed, concept-balanced validation set."""
        return self._fixed_loader(self.val_per_concept, _VAL_STREAM)

    def probe_dataloader(self, n_per_concept: int | None = None) -> DataLoader:
        """The fixed, concept-balanced probe set for Concept Decodability (same on every process)."""
        return self._fixed_loader(n_per_concept or self.probe_per_concept, _PROBE_STREAM)

    def _fixed_loader(self, n_per_concept: int, stream: int) -> DataLoader:
        batches = fixed_batches(self.task, n_per_concept, self.seed, stream, self.eval_batch_size)
        return DataLoader(batches, batch_size=None)
