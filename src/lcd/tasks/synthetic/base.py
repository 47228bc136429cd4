"""The interface every synthetic ICL task implements."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class ICLTask(ABC):
    """A distribution over in-context regression prompts whose latent concept is known.

    A sample is a dict with ``xs`` (B, n_pairs, n_dims), ``ys`` (B, n_pairs) and ``concept`` (B,),
    the integer id of the latent concept that generated each sequence.
    """

    n_dims: int
    n_pairs: int

    @property
    @abstractmethod
    def concept_names(self) -> list[str]:
        """Human-readable name of each concept, indexed by concept id."""

    @property
    def n_concepts(self) -> int:
        """Number of latent concepts."""
        return len(self.concept_names)

    @abstractmethod
    def sample(
        self, batch_size: int, generator: torch.Generator, concept: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Draw ``batch_size`` prompts.

        Args:
            batch_size: Number of sequences.
            generator: Source of randomness; the same generator state gives the same batch.
            concept: Optional (B,) concept ids to use instead of drawing them uniformly.

        """

    def balanced_concepts(self, n_per_concept: int) -> torch.Tensor:
        """Concept ids with exactly ``n_per_concept`` of each concept, grouped by concept."""
        return torch.arange(self.n_concepts).repeat_interleave(n_per_concept)
