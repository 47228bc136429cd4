"""Mixture of sparse linear regressions (PAPER.md §1) and a mixture of function families.

The latent concept of a sequence is the basis B_k (a set of active input dimensions) that masks its
weight vector: ``w ~ N(0, I_D) * mask_k``, ``x_i ~ N(0, I_D)``, ``y_i = w·x_i + eps``,
``eps ~ N(0, noise_var)``. A fresh ``w`` and fresh ``x`` are drawn for every sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from lcd.tasks.synthetic.base import ICLTask

BasisFamily = Literal["orthogonal", "overlapping", "explicit"]
FunctionFamily = Literal["linear", "sparse_linear", "leaky_relu", "quadratic"]


def make_bases(
    n_dims: int,
    n_concepts: int,
    rank: int,
    family: BasisFamily = "orthogonal",
    n_groups: int = 2,
    index_sets: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """Build the K basis masks, one row of active input dimensions per concept.

    Families:
        ``orthogonal``: concept k owns dims ``[k*rank, (k+1)*rank)``; needs ``K*rank <= D``.
        ``overlapping``: the D dims split into ``n_groups`` equal groups and the K concepts into the same
            number of groups; within a group of G dims holding m concepts, concept j takes the ``rank``
            consecutive dims starting at ``j*(G//m)`` (wrapping), so concepts of one group share dims and
            concepts of different groups share none. D=16, K=8, r=4, 2 groups is the paper's variant.
        ``explicit``: ``index_sets[k]`` lists the active dims of concept k.

    Returns:
        Bool tensor (K, D).

    Raises:
        ValueError: if the setting is impossible, with what to change.

    """
    if n_dims < 1:
        raise ValueError(f"n_dims must be >= 1, got {n_dims}.")
    if family == "explicit":
        if not index_sets:
            raise ValueError("bases='explicit' needs index_sets: one list of active dimensions per concept.")
        masks = torch.zeros(len(index_sets), n_dims, dtype=torch.bool)
        for k, dims in enumerate(index_sets):
            if not dims:
                raise ValueError(f"index_sets[{k}] is empty: every concept needs at least one active dim.")
            bad = [d for d in dims if not 0 <= d < n_dims]
            if bad:
                raise ValueError(f"index_sets[{k}] has dims {bad} outside [0, {n_dims}); raise n_dims or fix them.")
            masks[k, list(dims)] = True
        if len({tuple(m.tolist()) for m in masks}) < len(masks):
            raise ValueError("index_sets has two identical concepts: their ids could not be told apart.")
        return masks
    if n_concepts < 2:
        raise ValueError(f"n_concepts must be >= 2 for a concept to be latent, got {n_concepts}.")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}.")
    if family == "orthogonal":
        if n_concepts * rank > n_dims:
            raise ValueError(
                f"orthogonal bases need n_concepts * rank <= n_dims, got {n_concepts} * {rank} > {n_dims}: "
                "raise n_dims, or lower n_concepts or rank, or use bases='overlapping'."
            )
        masks = torch.zeros(n_concepts, n_dims, dtype=torch.bool)
        for k in range(n_concepts):
            masks[k, k * rank : (k + 1) * rank] = True
        return masks
    if family == "overlapping":
        if n_dims % n_groups or n_concepts % n_groups:
            raise ValueError(
                f"overlapping bases split n_dims ({n_dims}) and n_concepts ({n_concepts}) into n_groups "
                f"({n_groups}) equal groups: choose values divisible by n_groups."
            )
        group_dims, per_group = n_dims // n_groups, n_concepts // n_groups
        if rank > group_dims:
            raise ValueError(f"rank ({rank}) exceeds the dims per group ({group_dims}): lower rank or n_groups.")
        stride = max(group_dims // per_group, 1)
        masks = torch.zeros(n_concepts, n_dims, dtype=torch.bool)
        for g in range(n_groups):
            for j in range(per_group):
                dims = [g * group_dims + (j * stride + t) % group_dims for t in range(rank)]
                masks[g * per_group + j, dims] = True
        if len({tuple(m.tolist()) for m in masks}) < n_concepts:
            raise ValueError("overlapping bases came out identical: raise n_dims per group or lower rank.")
        return masks
    raise ValueError(f"unknown basis family {family!r}; use 'orthogonal', 'overlapping' or 'explicit'.")


def _check_common(n_dims: int, n_pairs: int, noise_var: float) -> None:
    if n_dims < 1:
        raise ValueError(f"n_dims must be >= 1, got {n_dims}.")
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be >= 1 (at least one (x, y) pair per prompt), got {n_pairs}.")
    if noise_var < 0:
        raise ValueError(f"noise_var is a variance and must be >= 0, got {noise_var}.")


class SparseRegressionTask(ICLTask):
    """Mixture of sparse linear regressions: the concept is the basis that masks the weights.

    Args:
        n_dims: Input dimension D.
        n_concepts: Number of bases K.
        rank: Active dims per basis r (ignored for ``bases='explicit'``).
        n_pairs: In-context (x, y) pairs per prompt.
        noise_var: Variance of the label noise eps.
        bases: Basis family: ``orthogonal`` (paper default), ``overlapping`` or ``explicit``.
        n_groups: Number of dim groups for ``overlapping`` bases.
        index_sets: Active dims of each concept for ``explicit`` bases.

    """

    def __init__(
        self,
        n_dims: int = 16,
        n_concepts: int = 4,
        rank: int = 4,
        n_pairs: int = 20,
        noise_var: float = 0.01,
        bases: BasisFamily = "orthogonal",
        n_groups: int = 2,
        index_sets: list[list[int]] | None = None,
    ) -> None:
        _check_common(n_dims, n_pairs, noise_var)
        self.n_dims, self.n_pairs, self.noise_var = n_dims, n_pairs, noise_var
        self.masks = make_bases(n_dims, n_concepts, rank, bases, n_groups, index_sets)  # (K, D)

    @property
    def concept_names(self) -> list[str]:
        """``basis_<k>`` for each basis."""
        return [f"basis_{k}" for k in range(len(self.masks))]

    def sample(
        self, batch_size: int, generator: torch.Generator, concept: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Draw prompts; see :class:`~lcd.tasks.synthetic.base.ICLTask`."""
        if concept is None:
            concept = torch.randint(self.n_concepts, (batch_size,), generator=generator)
        xs = torch.randn(batch_size, self.n_pairs, self.n_dims, generator=generator)
        mask = self.masks[concept].float()  # (B, D)
        w = torch.randn(batch_size, self.n_dims, generator=generator) * mask
        noise = torch.randn(batch_size, self.n_pairs, generator=generator) * self.noise_var**0.5
        ys = torch.einsum("bnd,bd->bn", xs, w) + noise
        return {"xs": xs, "ys": ys, "concept": concept, "mask": mask, "weights": w}


class FunctionMixtureTask(ICLTask):
    """Mixture of function families; the family is the concept.

    ``w ~ N(0, I_D)`` per sequence, ``u = w·x``, then per family:
    ``linear`` y = u; ``sparse_linear`` y = (w * m)·x with a random support m of ``sparsity`` dims;
    ``leaky_relu`` y = leaky_relu(u, 0.1); ``quadratic`` y = (w·x²) / sqrt(3) (unit-ish variance per dim).
    Label noise ``N(0, noise_var)`` is added to every family.

    Args:
        n_dims: Input dimension D.
        n_pairs: In-context (x, y) pairs per prompt.
        families: The function families, one concept each.
        sparsity: Active dims of ``sparse_linear``.
        noise_var: Variance of the label noise.

    """

    def __init__(
        self,
        n_dims: int = 16,
        n_pairs: int = 20,
        families: list[FunctionFamily] | None = None,
        sparsity: int = 4,
        noise_var: float = 0.01,
    ) -> None:
        _check_common(n_dims, n_pairs, noise_var)
        self.families = list(families or ["linear", "sparse_linear", "leaky_relu", "quadratic"])
        if len(self.families) < 2 or len(set(self.families)) < len(self.families):
            raise ValueError(f"families needs at least two distinct entries, got {self.families}.")
        if not 1 <= sparsity <= n_dims:
            raise ValueError(f"sparsity must be in [1, n_dims={n_dims}], got {sparsity}.")
        self.n_dims, self.n_pairs, self.noise_var, self.sparsity = n_dims, n_pairs, noise_var, sparsity

    @property
    def concept_names(self) -> list[str]:
        """The family names."""
        return list(self.families)

    def sample(
        self, batch_size: int, generator: torch.Generator, concept: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Draw prompts; see :class:`~lcd.tasks.synthetic.base.ICLTask`."""
        if concept is None:
            concept = torch.randint(self.n_concepts, (batch_size,), generator=generator)
        xs = torch.randn(batch_size, self.n_pairs, self.n_dims, generator=generator)
        w = torch.randn(batch_size, self.n_dims, generator=generator)
        support = torch.rand(batch_size, self.n_dims, generator=generator).argsort(dim=1) < self.sparsity
        ys = torch.empty(batch_size, self.n_pairs)
        weights = w.clone()
        for k, family in enumerate(self.families):
            rows = concept == k
            x, v = xs[rows], w[rows]
            if family == "linear":
                y = torch.einsum("bnd,bd->bn", x, v)
            elif family == "sparse_linear":
                weights[rows] = v * support[rows]
                y = torch.einsum("bnd,bd->bn", x, weights[rows])
            elif family == "leaky_relu":
                y = F.leaky_relu(torch.einsum("bnd,bd->bn", x, v), 0.1)
            else:  # quadratic
                y = torch.einsum("bnd,bd->bn", x**2, v) / 3**0.5
            ys[rows] = y
        ys = ys + torch.randn(batch_size, self.n_pairs, generator=generator) * self.noise_var**0.5
        return {"xs": xs, "ys": ys, "concept": concept, "weights": weights}
