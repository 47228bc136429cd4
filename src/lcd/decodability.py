"""Concept Decodability (CD): how separable the latent concept is in one layer's representation.

CD (PAPER.md §3) is the leave-one-out k-NN accuracy of the concept label, k = 10: each point is
classified by a majority vote of its k nearest *other* points (it never votes for itself), and the
accuracy is pooled over all points of all concepts. Chance is ``1 / n_classes``.

Conventions (documented because the paper leaves them open):
- Distance: Euclidean by default; ``cosine`` uses 1 - cosine similarity (Euclidean distance of the
  vectors normalised in float64, which ranks neighbours identically).
- Exactness: the neighbours are those of a float64 evaluation of sum_k (x_ik - x_jk)^2, so the
  predictions equal scikit-learn's float64 ``KNeighborsClassifier`` under ``LeaveOneOut`` (up to that
  library's own float64 rounding, which only 1e-13-close distances could notice; see below).
- Ties in distance (e.g. duplicate points): the neighbour with the lower index comes first.
- Ties in the vote: the smallest label wins, as in scikit-learn's ``KNeighborsClassifier``.
- Every concept needs more than k points: a point's own concept can supply at most size - 1 of its k
  votes, so k >= the smallest concept's size is refused (:func:`check_knn_settings`).

The neighbours are exact and fast: :mod:`lcd.neighbours` centres and scales each layer, ranks by a float32
Gram matrix and certifies every point's k nearest with a rigorous error bound, redoing in float64 the
rows it cannot certify (``benchmarks/cd_speed.py`` measures it against scikit-learn).

Everything else here is plain torch (CPU or GPU) except the optional scikit-learn linear probe.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torchmetrics import Metric

from lcd.neighbours import loo_neighbours

Distance = Literal["euclidean", "cosine"]
DISTANCES: tuple[str, ...] = get_args(Distance)

__all__ = [
    "DISTANCES",
    "ConceptDecodabilityMetric",
    "chance_level",
    "check_knn_settings",
    "concept_decodability",
    "decodability_report",
    "knn_loo_predictions",
    "layerwise_decodability",
    "linear_probe_accuracy",
    "pairwise_decodability",
    "per_concept_decodability",
    "shuffled_decodability",
]


def check_knn_settings(
    k: int,
    distance: str = "euclidean",
    smallest_class: int | None = None,
    *,
    k_name: str = "k",
    distance_name: str = "distance",
    class_name: str = "the smallest concept",
    grow: str = "give every concept at least {n} points",
) -> None:
    """Refuse k-NN settings that cannot give a meaningful CD, with a message that says what to change.

    Args:
        k: Number of neighbours; must be a positive integer.
        distance: One of :data:`DISTANCES`, case-sensitive.
        smallest_class: Size of the smallest class (``None``: not checked). Leave-one-out k-NN needs
            more than k points in every class: a point's own class supplies at most size - 1 of its k votes
            (3 prompts per concept and k = 10 give CD 0).
        k_name: The caller's name of the ``k`` option, for the message.
        distance_name: The caller's name of the ``distance`` option.
        class_name: What ``smallest_class`` counts, for the message.
        grow: How to get ``{n}`` points per class, for the message.

    Raises:
        ValueError: for k < 1, an unknown distance, or k >= ``smallest_class``.

    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{k_name} must be a positive integer (the paper's 10), got {k!r}.")
    if distance not in DISTANCES:
        valid = ", ".join(repr(d) for d in DISTANCES)
        raise ValueError(f"{distance_name} must be one of {valid} (case-sensitive), got {distance!r}.")
    if smallest_class is not None and k >= smallest_class:
        fix = grow.format(n=k + 1)
        if smallest_class > 1:
            fix = f"set {k_name} to at most {smallest_class - 1}, or {fix}"
        raise ValueError(
            f"{k_name}={k} is too large: {class_name} has only {smallest_class} points, and leave-one-out {k}-NN "
            f"needs at least k + 1 = {k + 1} in every concept (a point's own concept supplies at most "
            f"{smallest_class - 1} of its {k} votes). To fix: {fix}."
        )


def _check(features: torch.Tensor, labels: torch.Tensor, k: int, distance: str) -> None:
    if features.dim() not in (2, 3) or labels.dim() != 1 or features.shape[-2] != labels.shape[0]:
        raise ValueError(
            f"features must be (N, d) or (L, N, d) and labels (N,); got {tuple(features.shape)} and "
            f"{tuple(labels.shape)}."
        )
    if features.is_complex() or features.dtype == torch.bool:
        raise ValueError(f"features must be real numbers, got {features.dtype}.")
    classes, counts = labels.unique(return_counts=True)
    if classes.numel() < 2:
        raise ValueError("CD needs at least two concepts; all points share one label.")
    smallest = int(counts.argmin())
    check_knn_settings(k, distance, int(counts[smallest]), class_name=f"concept {classes[smallest].item()}")
    if not torch.isfinite(features.sum()) and not torch.isfinite(features).all():  # cheap test first
        raise ValueError(
            "features contain NaN or inf: the model's activations diverged or the input is broken; "
            "CD cannot rank such points (check the model's dtype and the inputs)."
        )


def knn_loo_predictions(
    features: torch.Tensor,
    labels: torch.Tensor,
    k: int = 10,
    distance: Distance = "euclidean",
    chunk_size: int = 2048,
) -> torch.Tensor:
    """Leave-one-out k-NN label predictions, equal to scikit-learn's float64 ones (see the module docstring).

    Args:
        features: (N, d), or (L, N, d) to score L layers at once.
        labels: (N,) integer concept ids.
        k: Number of neighbours; every concept needs more than k points.
        distance: ``euclidean`` or ``cosine``.
        chunk_size: Query rows per distance block; memory is O(chunk_size * N) per layer.

    Returns:
        (N,) or (L, N) predicted labels.

    Raises:
        ValueError: for malformed shapes, k < 1 or k >= the smallest concept's size, an unknown
            distance, or NaN / inf features (the message says what to change).

    """
    _check(features, labels, k, distance)
    squeeze = features.dim() == 2
    x = features.detach()[None] if squeeze else features.detach()  # (L, N, d)
    labels = labels.to(x.device)
    classes, y = labels.unique(return_inverse=True)  # y: labels as 0..C-1
    preds = torch.empty(x.shape[:2], dtype=torch.long, device=x.device)
    for layer in range(x.shape[0]):
        idx = loo_neighbours(x[layer], k, distance, chunk_size)  # (N, k)
        votes = torch.nn.functional.one_hot(y[idx], len(classes)).sum(-2)  # (N, C)
        preds[layer] = votes.argmax(-1)  # ties -> first max -> smallest label
    preds = classes[preds]
    return preds[0] if squeeze else preds


def concept_decodability(
    features: torch.Tensor, labels: torch.Tensor, k: int = 10, distance: Distance = "euclidean"
) -> float | torch.Tensor:
    """CD: leave-one-out k-NN accuracy pooled over all points.

    Args:
        features: (N, d) hidden states, or (L, N, d) for L layers at once.
        labels: (N,) concept ids.
        k: Number of neighbours (the paper's 10).
        distance: ``euclidean`` (default) or ``cosine``.

    Returns:
        A float for (N, d) input, or an (L,) tensor of CD per layer.

    """
    preds = knn_loo_predictions(features, labels, k, distance)
    acc = (preds == labels.to(preds.device)).float().mean(-1)
    return acc.item() if acc.dim() == 0 else acc.cpu()


def per_concept_decodability(
    features: torch.Tensor, labels: torch.Tensor, k: int = 10, distance: Distance = "euclidean"
) -> dict[int, float]:
    """CD restricted to each concept's points (neighbours still come from all concepts)."""
    preds = knn_loo_predictions(features, labels, k, distance)
    correct = (preds == labels.to(preds.device)).cpu()
    return {int(c): correct[labels == c].float().mean().item() for c in labels.unique()}


def layerwise_decodability(
    features: torch.Tensor, labels: torch.Tensor, k: int = 10, distance: Distance = "euclidean"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CD and per-concept CD of every layer from one batched k-NN pass.

    Args:
        features: (L, N, d) hidden states of L layers for the same N prompts.
        labels: (N,) concept ids.
        k: Number of neighbours.
        distance: ``euclidean`` or ``cosine``.

    Returns:
        cd (L,), per_concept (L, C) and the sorted concept ids (C,) its columns refer to.

    """
    preds = knn_loo_predictions(features, labels, k, distance)  # (L, N)
    labels = labels.to(preds.device)
    correct = (preds == labels).float()
    classes = labels.unique()
    onehot = torch.nn.functional.one_hot(torch.searchsorted(classes, labels), len(classes)).float()  # (N, C)
    per_concept = (correct @ onehot) / onehot.sum(0)  # (L, C)
    return correct.mean(-1).cpu(), per_concept.cpu(), classes.cpu()


def pairwise_decodability(
    features: torch.Tensor, labels: torch.Tensor, k: int = 10, distance: Distance = "euclidean"
) -> torch.Tensor:
    """Concept x concept matrix: entry (i, j) is CD computed on the points of concepts i and j alone.

    The diagonal is 1. Pairs that stay near chance (0.5) are entangled; near 1, separated.

    Returns:
        (C, C) tensor, rows and columns in sorted label order.

    """
    classes = labels.unique()
    out = torch.ones(len(classes), len(classes))
    for i in range(len(classes)):
        for j in range(i + 1, len(classes)):
            keep = (labels == classes[i]) | (labels == classes[j])
            out[i, j] = out[j, i] = concept_decodability(features[keep], labels[keep], k, distance)
    return out


def chance_level(labels: torch.Tensor) -> float:
    """Chance CD: one over the number of classes (the paper's convention)."""
    return 1.0 / labels.unique().numel()


def shuffled_decodability(
    features: torch.Tensor, labels: torch.Tensor, k: int = 10, distance: Distance = "euclidean", seed: int = 0
) -> float | torch.Tensor:
    """Control: CD with the labels randomly permuted; should sit near chance."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(labels.shape[0], generator=g)
    return concept_decodability(features, labels[perm], k, distance)


def linear_probe_accuracy(
    features: torch.Tensor, labels: torch.Tensor, test_fraction: float = 0.2, seed: int = 0
) -> float:
    """Second probe: held-out accuracy of a scikit-learn logistic regression (stratified split)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = features.float().cpu().numpy(), labels.cpu().numpy()
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    return float(probe.fit(x_tr, y_tr).score(x_te, y_te))


def decodability_report(
    features: torch.Tensor,
    labels: torch.Tensor,
    k: int = 10,
    distance: Distance = "euclidean",
    shuffled_control: bool = False,
    linear_probe: bool = False,
) -> dict[str, float | dict[int, float] | torch.Tensor]:
    """Everything about one layer's representation at once: CD, per-concept CD, pairwise, chance.

    Args:
        features: (N, d) hidden states of one layer.
        labels: (N,) concept ids.
        k: Number of neighbours.
        distance: ``euclidean`` or ``cosine``.
        shuffled_control: Also compute CD with shuffled labels.
        linear_probe: Also fit the held-out logistic-regression probe.

    """
    preds = knn_loo_predictions(features, labels, k, distance).cpu()
    labels = labels.cpu()
    correct = preds == labels
    report: dict[str, float | dict[int, float] | torch.Tensor] = {
        "cd": correct.float().mean().item(),
        "per_concept": {int(c): correct[labels == c].float().mean().item() for c in labels.unique()},
        "chance": chance_level(labels),
        "pairwise": pairwise_decodability(features, labels, k, distance),
    }
    if shuffled_control:
        report["shuffled"] = shuffled_decodability(features, labels, k, distance)
    if linear_probe:
        report["linear_probe"] = linear_probe_accuracy(features, labels)
    return report


class ConceptDecodabilityMetric(Metric):
    """torchmetrics accumulator of (features, labels) over batches and devices; ``compute`` gives CD.

    Under DDP the states are gathered from every process (``dist_reduce_fx="cat"``), so all ranks
    score the same pooled set, exactly as one process would.

    Args:
        k: Number of neighbours.
        distance: ``euclidean`` or ``cosine``.

    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, k: int = 10, distance: Distance = "euclidean", **kwargs) -> None:
        super().__init__(**kwargs)
        check_knn_settings(k, distance)
        self.k, self.distance = k, distance
        self.add_state("features", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch: features (B, d) or (L, B, d) for L layers, labels (B,)."""
        self.features.append(features.detach().float().transpose(0, -2) if features.dim() == 3 else features)
        self.labels.append(labels.detach())

    def compute(self) -> dict[str, torch.Tensor]:
        """CD of everything seen so far, from all processes.

        Returns:
            ``cd`` ((L,) for layered features, else a scalar), ``per_concept`` ((L, C) or (C,)) and
            ``classes`` (C,), the concept ids of the per-concept columns.

        """
        feats = self.features if isinstance(self.features, torch.Tensor) else torch.cat(self.features)
        labels = self.labels if isinstance(self.labels, torch.Tensor) else torch.cat(self.labels)
        layered = feats.dim() == 3
        if layered:  # stored as (N, L, d) so DDP can concatenate along dim 0
            feats = feats.transpose(0, 1)
        cd, per_concept, classes = layerwise_decodability(
            feats if layered else feats[None], labels, self.k, self.distance
        )
        if not layered:
            cd, per_concept = cd[0], per_concept[0]
        return {"cd": cd, "per_concept": per_concept, "classes": classes}
