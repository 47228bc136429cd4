"""Concept Decodability (CD): how separable the latent concept is in one layer's representation.

CD (PAPER.md §3) is the leave-one-out k-NN accuracy of the concept label, k = 10: each point is
classified by a majority vote of its k nearest *other* points (it never votes for itself), and the
accuracy is pooled over all points of all concepts. Chance is ``1 / n_classes``.

Conventions (documented because the paper leaves them open):
- Distance: Euclidean by default; ``cosine`` uses 1 - cosine similarity.
- Ties in distance: the neighbour with the lower index comes first (stable sort).
- Ties in the vote: the smallest label wins, as in scikit-learn's ``KNeighborsClassifier``.

Everything here is plain torch (CPU or GPU) except the optional scikit-learn linear probe, and works
chunk by chunk so memory stays bounded for large N.
"""

from __future__ import annotations

from typing import Literal

import torch
from torchmetrics import Metric

Distance = Literal["euclidean", "cosine"]

__all__ = [
    "ConceptDecodabilityMetric",
    "chance_level",
    "concept_decodability",
    "decodability_report",
    "knn_loo_predictions",
    "layerwise_decodability",
    "linear_probe_accuracy",
    "pairwise_decodability",
    "per_concept_decodability",
    "shuffled_decodability",
]


def _check(features: torch.Tensor, labels: torch.Tensor, k: int) -> None:
    if features.dim() < 2 or labels.dim() != 1 or features.shape[-2] != labels.shape[0]:
        raise ValueError(
            f"features must be (N, d) or (L, N, d) and labels (N,); got {tuple(features.shape)} and "
            f"{tuple(labels.shape)}."
        )
    n = labels.shape[0]
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    if n < k + 1:
        raise ValueError(f"leave-one-out {k}-NN needs at least k + 1 = {k + 1} points, got {n}: add prompts.")
    if labels.unique().numel() < 2:
        raise ValueError("CD needs at least two concepts; all points share one label.")
    if not torch.isfinite(features.sum()) and not torch.isfinite(features).all():  # cheap test first
        raise ValueError("features contain NaN or inf: the model's activations diverged or the input is broken.")


def _k_nearest(d: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k smallest entries of each row of ``d``, distance ties broken by lower index.

    ``topk`` is ~20x faster than a full sort but orders ties arbitrarily, so rows where a tie reaches
    the k-th place are redone with a stable sort.
    """
    vals, idx = d.topk(k + 1, dim=-1, largest=False)  # (..., k + 1)
    tied = vals[..., k - 1] == vals[..., k]  # the (k+1)-th equals the k-th: a tie reaches the k-th place
    idx = idx[..., :k]
    if tied.any():
        idx[tied] = d[tied].argsort(dim=-1, stable=True)[..., :k]
    return idx


def knn_loo_predictions(
    features: torch.Tensor,
    labels: torch.Tensor,
    k: int = 10,
    distance: Distance = "euclidean",
    chunk_size: int = 2048,
) -> torch.Tensor:
    """Leave-one-out k-NN label predictions.

    Args:
        features: (N, d), or (L, N, d) to score L layers at once.
        labels: (N,) integer concept ids.
        k: Number of neighbours.
        distance: ``euclidean`` or ``cosine``.
        chunk_size: Query rows per distance block; memory is O(L * chunk_size * N).

    Returns:
        (N,) or (L, N) predicted labels.

    """
    _check(features, labels, k)
    squeeze = features.dim() == 2
    x = features.float()[None] if squeeze else features.float()  # (L, N, d)
    if distance == "cosine":
        x = torch.nn.functional.normalize(x, dim=-1)
    labels = labels.to(x.device)
    classes, y = labels.unique(return_inverse=True)  # y: labels as 0..C-1
    sq = (x * x).sum(-1)  # (L, N)
    n = x.shape[1]
    preds = torch.empty(x.shape[0], n, dtype=torch.long, device=x.device)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        # squared Euclidean distance of the chunk's rows to every point, less |x_i|^2 (constant per row,
        # so the neighbour order is unchanged): |x_j|^2 - 2 x_i.x_j, fused in one call: (L, c, N)
        d = torch.baddbmm(sq[:, None, :], x[:, start:stop], x.transpose(1, 2), alpha=-2)
        rows = torch.arange(stop - start, device=x.device)
        d[:, rows, rows + start] = float("inf")  # leave one out: a point never votes for itself
        idx = _k_nearest(d, k)  # (L, c, k)
        votes = torch.nn.functional.one_hot(y[idx], len(classes)).sum(-2)  # (L, c, C)
        preds[:, start:stop] = votes.argmax(-1)  # ties -> first max -> smallest label
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
