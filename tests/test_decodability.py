import pytest
import torch
from sklearn.model_selection import LeaveOneOut, cross_val_predict
from sklearn.neighbors import KNeighborsClassifier

from lcd.decodability import (
    ConceptDecodabilityMetric,
    chance_level,
    concept_decodability,
    decodability_report,
    knn_loo_predictions,
    layerwise_decodability,
    linear_probe_accuracy,
    pairwise_decodability,
    per_concept_decodability,
    shuffled_decodability,
)


def clusters(n_per: int = 50, n_concepts: int = 4, d: int = 16, spread: float = 0.1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_concepts, d, generator=g) * 5
    labels = torch.arange(n_concepts).repeat_interleave(n_per)
    return centers[labels] + spread * torch.randn(len(labels), d, generator=g), labels


def test_planted_clusters_give_cd_one():
    x, y = clusters()
    assert concept_decodability(x, y) == 1.0
    assert linear_probe_accuracy(x, y) == 1.0


def test_shuffled_labels_give_chance():
    x, y = clusters(n_per=100)
    assert chance_level(y) == 0.25
    assert abs(shuffled_decodability(x, y, seed=3) - 0.25) < 0.08
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(400, 16, generator=g)
    assert abs(concept_decodability(noise, y) - 0.25) < 0.08


def test_a_point_never_votes_for_itself():
    # A (label 0) at 0; B (1) at 0.1; C (0) at 0.2; D (1) at 0.3; far points pad the set.
    x = torch.tensor([[0.0], [0.1], [0.2], [0.3], [50.0], [51.0], [52.0]])
    y = torch.tensor([0, 1, 0, 1, 2, 2, 2])
    # Leave-one-out 3-NN of A: B, C, D -> label 1. Counting A itself (A, B, C) would give 0.
    assert knn_loo_predictions(x, y, k=3)[0].item() == 1


def test_agrees_with_sklearn_leave_one_out():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(120, 5, generator=g)
    y = torch.randint(0, 3, (120,), generator=g)
    ours = knn_loo_predictions(x, y, k=10)
    theirs = cross_val_predict(KNeighborsClassifier(10), x.numpy(), y.numpy(), cv=LeaveOneOut())
    assert ours.tolist() == theirs.tolist()
    assert concept_decodability(x, y) == pytest.approx((theirs == y.numpy()).mean())


def test_chunking_and_layers_do_not_change_the_answer():
    x, y = clusters(n_per=30, spread=3.0)
    full = knn_loo_predictions(x, y, chunk_size=4096)
    assert knn_loo_predictions(x, y, chunk_size=7).equal(full)
    stacked = torch.stack([x, torch.randn_like(x)])
    layered = knn_loo_predictions(stacked, y, chunk_size=11)
    assert layered[0].equal(full)
    cd, per_concept, classes = layerwise_decodability(stacked, y)
    assert cd[0].item() == pytest.approx(concept_decodability(x, y))
    assert per_concept[0].tolist() == pytest.approx(list(per_concept_decodability(x, y).values()))
    assert classes.tolist() == [0, 1, 2, 3]


def test_distance_ties_break_by_lower_index():
    x = torch.zeros(12, 2)  # every distance ties
    y = torch.tensor([1] * 6 + [0] * 6)
    # Neighbours of point 11 are points 0..9 (lowest indices): six 1s and four 0s -> 1.
    assert knn_loo_predictions(x, y, k=10)[11].item() == 1
    # Neighbours of point 0 are points 1..10: five 1s and five 0s -> vote tie -> smallest label 0.
    assert knn_loo_predictions(x, y, k=10)[0].item() == 0


def test_pairwise_matrix_shows_entangled_pairs():
    x, y = clusters(n_per=40)
    y = y.clone()
    x[y == 1] = x[y == 0][torch.randperm(40)] + 0.01 * torch.randn(40, 16)  # concept 1 sits on concept 0
    m = pairwise_decodability(x, y)
    assert m.shape == (4, 4) and torch.allclose(m, m.T) and (m.diag() == 1).all()
    assert m[0, 1] < 0.8 and m[2, 3] == 1.0
    report = decodability_report(x, y, shuffled_control=True, linear_probe=True)
    assert report["per_concept"][2] == 1.0 and report["per_concept"][0] < 0.9
    assert report["chance"] == 0.25 and report["shuffled"] < 0.5


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (torch.randn(10, 3), torch.arange(10) % 2, "at least k \\+ 1 = 11"),
        (torch.randn(30, 3), torch.zeros(30, dtype=torch.long), "at least two concepts"),
        (torch.full((30, 3), float("nan")), torch.arange(30) % 2, "NaN or inf"),
    ],
)
def test_clear_errors(x, y, message):
    with pytest.raises(ValueError, match=message):
        concept_decodability(x, y)


def test_metric_accumulates_batches():
    x, y = clusters(n_per=30, spread=3.0)
    layered = torch.stack([x, x * 2])  # (L, N, d)
    metric = ConceptDecodabilityMetric()
    for i in range(0, 120, 25):
        metric.update(layered[:, i : i + 25], y[i : i + 25])
    out = metric.compute()
    expected = concept_decodability(layered, y)
    assert out["cd"].tolist() == pytest.approx(expected.tolist())
    assert out["per_concept"].shape == (2, 4)
