"""Training curricula: what training batch ``index`` looks like, as a pure function of the index.

A curriculum replaces ``task.sample`` in the training stream of
:class:`~lcd.data.SyntheticICLDataModule`. It receives the batch's own seeded generator and its index,
so the stream stays a pure function of ``(seed, index)``: a run resumed from a checkpoint, or one DDP
rank, sees exactly the batches the uninterrupted single-process run would. Validation and probe sets
never go through a curriculum: they always cover every concept.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from lcd.tasks.synthetic.base import ICLTask


class Curriculum(ABC):
    """Draws training batch ``index`` of a task."""

    @abstractmethod
    def sample(self, task: ICLTask, batch_size: int, generator: torch.Generator, index: int) -> dict[str, torch.Tensor]:
        """Draw training batch number ``index`` (0-based, counted over the whole run and all processes).

        Args:
            task: The task to draw from.
            batch_size: Number of sequences.
            generator: The batch's own generator (seeded from the run seed and ``index``).
            index: Global index of the batch in the training stream.

        """


class ConceptCurriculum(Curriculum):
    """Introduce the latent concepts one at a time, then train on all of them.

    Concept ``k`` (0-based) joins the training mix at batch ``k * batches_per_concept``; each batch draws
    its concepts uniformly from those already introduced. From batch ``(K - 1) * batches_per_concept``
    on, the stream is the full task. With one concept the model only has to learn in-context regression
    on a fixed basis, which leaves the initial loss plateau far sooner than the full mixture does; each
    new concept then only has to be told apart from the known ones (README, "Results: synthetic CPU
    preset", has runs with and without it).

    The order is fixed (concept 0 first), so which concept is learned first is set by the curriculum,
    not by the seed: use no curriculum (the paper's setting) to study the order of emergence.

    Args:
        batches_per_concept: Training batches between the introduction of two successive concepts.

    """

    def __init__(self, batches_per_concept: int = 1000) -> None:
        if batches_per_concept < 1:
            raise ValueError(f"batches_per_concept must be >= 1, got {batches_per_concept}.")
        self.batches_per_concept = batches_per_concept

    def n_active(self, n_concepts: int, index: int) -> int:
        """Number of concepts in the training mix at batch ``index``."""
        return min(n_concepts, 1 + index // self.batches_per_concept)

    def sample(self, task: ICLTask, batch_size: int, generator: torch.Generator, index: int) -> dict[str, torch.Tensor]:
        """Draw batch ``index`` with concepts uniform over the first :meth:`n_active` concepts."""
        n_active = self.n_active(task.n_concepts, index)
        if n_active == task.n_concepts:
            return task.sample(batch_size, generator)  # the full task: identical to the no-curriculum stream
        concept = torch.randint(n_active, (batch_size,), generator=generator)
        return task.sample(batch_size, generator, concept=concept)


class ActiveDimsCurriculum(Curriculum):
    """Fade in the input dims outside each prompt's basis: a dimension curriculum for sparse regression.

    In training batch ``i`` the dims of ``x`` outside the prompt's basis are multiplied by
    ``scale(i)``: 0 for the first ``hold_batches`` batches, then rising linearly to 1 over the next
    ``ramp_batches``; from then on the stream is the full task, batch for batch. The labels are left
    untouched, which is exact: ``w`` is zero outside the basis, so ``y = w·x + eps`` does not depend on
    those dims. All K concepts are present from the start.

    Why: on the full task the first useful in-context algorithm (a gradient step on all D dims) buys
    little at small context lengths, so the loss sits on its initial plateau for thousands of steps.
    With the other dims silenced every prompt is an r-dim regression, which the model picks up quickly;
    fading the dims back in then teaches it to find the basis and ignore the rest. This is Garg et al.
    (2022)'s curriculum on the number of input dims, adapted to a basis that varies per prompt.

    Args:
        hold_batches: Batches with the dims outside the basis set to zero.
        ramp_batches: Batches over which their scale then rises linearly from 0 to 1.

    """

    def __init__(self, hold_batches: int = 1000, ramp_batches: int = 3000) -> None:
        if hold_batches < 0 or ramp_batches < 1:
            raise ValueError(f"need hold_batches >= 0 and ramp_batches >= 1, got {hold_batches}, {ramp_batches}.")
        self.hold_batches, self.ramp_batches = hold_batches, ramp_batches

    def scale(self, index: int) -> float:
        """Scale of the dims outside the basis in batch ``index``."""
        return min(1.0, max(0.0, (index - self.hold_batches) / self.ramp_batches))

    def sample(self, task: ICLTask, batch_size: int, generator: torch.Generator, index: int) -> dict[str, torch.Tensor]:
        """Draw batch ``index`` of the task and scale the dims outside each prompt's basis."""
        batch = task.sample(batch_size, generator)
        if "mask" not in batch:
            raise ValueError(
                f"ActiveDimsCurriculum needs prompts that carry their basis 'mask' (SparseRegressionTask); "
                f"{type(task).__name__} has none: use ConceptCurriculum or no curriculum."
            )
        scale = self.scale(index)
        if scale < 1.0:
            mask = batch["mask"]  # (B, D), 1 on the basis
            batch["xs"] = batch["xs"] * (mask + scale * (1 - mask))[:, None, :]  # (B, n, D)
        return batch
