import numpy as np
import pytest
import torch
from conftest import DEBUG, TINY_SYNTHETIC, config
from sklearn.model_selection import LeaveOneOut, cross_val_predict
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors
from tiny_lm import save_tiny_lm

from lcd.callbacks import ConceptDecodability
from lcd.cli import main
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
from lcd.neighbours import loo_neighbours


def clusters(n_per: int = 50, n_concepts: int = 4, d: int = 16, spread: float = 0.1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_concepts, d, generator=g) * 5
    labels = torch.arange(n_concepts).repeat_interleave(n_per)
    return centers[labels] + spread * torch.randn(len(labels), d, generator=g), labels


def sklearn_loo(x: torch.Tensor, y: torch.Tensor, k: int = 10, metric: str = "euclidean") -> list[int]:
    """scikit-learn's float64 leave-one-out predictions, fitted once: ``kneighbors()`` without X leaves each
    point out of its own neighbours, and the vote is ``KNeighborsClassifier.predict``'s (smallest label wins
    ties). Equal to ``cross_val_predict(KNeighborsClassifier(k), cv=LeaveOneOut())`` (checked below)."""
    ind = NearestNeighbors(n_neighbors=k, metric=metric).fit(x.double().numpy()).kneighbors(return_distance=False)
    classes = np.unique(y.numpy())
    votes = (y.numpy()[ind][:, :, None] == classes).sum(1)  # (N, C)
    return classes[votes.argmax(1)].tolist()


def exact_loo(x: torch.Tensor, y: torch.Tensor, k: int = 10) -> list[int]:
    """The definition itself: float64 sum of squared differences, distance ties to the lower index."""
    x = x.double()
    d = ((x[:, None] - x[None]) ** 2).sum(-1)  # (N, N)
    d.fill_diagonal_(float("inf"))
    idx = d.argsort(dim=-1, stable=True)[:, :k]
    votes = torch.nn.functional.one_hot(y[idx], int(y.max()) + 1).sum(1)
    return votes.argmax(-1).tolist()


def concepts(n_per: int = 30, n_concepts: int = 7, d: int = 64, seed: int = 0):
    """Overlapping concepts (CD ~0.7): many near-ties in the vote, so any wrong neighbour shows."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_concepts, d, generator=g) * 0.35
    labels = torch.arange(n_concepts).repeat_interleave(n_per)
    return centers[labels] + torch.randn(len(labels), d, generator=g), labels


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
    # A (label 0) at 0; B (1) at 0.1; C (0) at 0.2; D (1) at 0.3; far points give every concept 4 points.
    x = torch.tensor([[0.0], [0.1], [0.2], [0.3], [50.0], [51.0], [52.0], [53.0], [90], [91], [95], [96]])
    y = torch.tensor([0, 1, 0, 1, 2, 2, 2, 2, 0, 0, 1, 1])
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


# --- item 1: exact on the features of real residual streams --------------------------------------------------


@pytest.mark.parametrize("offset", [1e3, 3e3, 1e4])
def test_a_large_shared_offset_changes_nothing(offset):
    # Residual streams share a large component; float32 |x_i|^2 - 2 x_i.x_j cancelled it into noise (CD 0.50 /
    # 0.17 / 0.15 here instead of 0.68).
    x, y = concepts()
    reference = sklearn_loo(x + offset, y)
    assert (
        reference
        == cross_val_predict(KNeighborsClassifier(10), (x + offset).double().numpy(), y, cv=LeaveOneOut()).tolist()
    )
    assert reference == sklearn_loo(x, y) == exact_loo(x + offset, y)  # translation-invariant
    assert knn_loo_predictions(x + offset, y).tolist() == reference
    assert 0.6 < concept_decodability(x + offset, y) < 0.8


@pytest.mark.parametrize("chunk_size", [2048, 16])
@pytest.mark.parametrize("massive", [1e3, 1e4])
def test_a_few_massive_dimensions_change_nothing(massive, chunk_size):
    # Three coordinates ~1e3-1e4 larger than the rest that differ between points (0, M or 2M): centring cannot
    # remove them, and float32 after centring still got 36-140 of 210 predictions wrong on such data.
    x, y = concepts()
    g = torch.Generator().manual_seed(1)
    x[:, :3] += massive * torch.randint(0, 3, (len(y), 1), generator=g)
    reference = sklearn_loo(x, y)
    assert reference == exact_loo(x, y)
    assert knn_loo_predictions(x, y, chunk_size=chunk_size).tolist() == reference
    layered = knn_loo_predictions(torch.stack([x, x + 1e4]), y, chunk_size=chunk_size)
    assert layered[0].tolist() == layered[1].tolist() == reference


def test_cosine_of_nearly_parallel_vectors():
    # A shared offset makes every pair nearly parallel: 1 - cos ~ 1e-8, far below float32's resolution of cos.
    x, y = concepts()
    x = x + 1e3
    assert knn_loo_predictions(x, y, distance="cosine").tolist() == sklearn_loo(x, y, metric="cosine")


def test_duplicate_points_break_ties_by_lower_index():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 8, generator=g).repeat(13, 1)  # 10 distinct points, 13 copies each: exact ties
    y = torch.randint(0, 3, (130,), generator=g)
    y[:36] = torch.arange(3).repeat(12)  # every concept has enough points
    assert knn_loo_predictions(x + 1e3, y).tolist() == exact_loo(x + 1e3, y)


@pytest.mark.slow
def test_gemma3_270m_residual_streams_give_float64_predictions(gemma_bitwise_probe):
    # The residual streams of 105 bitwise prompts (7 classes x 15, Null included, 4 shots) that the Gemma probe
    # computed CD from (conftest: one forward pass shared with the probe's test). The old float32 formulation got
    # 79 / 45 / 38 predictions of layers 0 / 1 / 2 wrong on such features.
    _, features, labels = gemma_bitwise_probe
    assert features.shape == (18, 105, 640)
    ours = knn_loo_predictions(features, labels)  # all layers at once
    for layer in range(18):
        assert ours[layer].tolist() == sklearn_loo(features[layer], labels), f"layer {layer}"


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
    x = torch.zeros(24, 2)  # every distance ties
    y = torch.tensor([1] * 6 + [0] * 5 + [1] * 5 + [0] * 8)  # 11 and 13 points: enough for k = 10
    # Neighbours of point 23 are points 0..9 (lowest indices): six 1s and four 0s -> 1.
    assert knn_loo_predictions(x, y, k=10)[23].item() == 1
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
        (torch.randn(10, 3), torch.arange(10) % 2, "concept 0 has only 5 points.*at least k \\+ 1 = 11"),
        (torch.randn(30, 3), torch.zeros(30, dtype=torch.long), "at least two concepts"),
        (torch.full((30, 3), float("nan")), torch.arange(30) % 2, "NaN or inf"),
    ],
)
def test_clear_errors(x, y, message):
    with pytest.raises(ValueError, match=message):
        concept_decodability(x, y)


# --- item 2: degenerate settings are refused, with what to change -------------------------------------------


def test_k_at_least_the_smallest_concept_is_refused():
    x, y = concepts(n_per=3)  # 3 prompts per concept, k = 11: CD 0.0 before
    with pytest.raises(ValueError, match=r"k=11 is too large: concept 0 has only 3 points.*at most 2.*at least 12"):
        concept_decodability(x, y, k=11)
    x, y = concepts(n_per=20)
    y[y == 4] = 5  # concept 4 empty, concept 5 has 40 points
    y[:5] = 4  # concept 4: 5 points; concept 0: 15
    with pytest.raises(ValueError, match=r"concept 4 has only 5 points.*set k to at most 4"):
        layerwise_decodability(torch.stack([x, x]), y)
    reference = (torch.tensor(sklearn_loo(x, y, k=4)) == y).double().mean().item()
    assert concept_decodability(x, y, k=4) == pytest.approx(reference)  # the largest usable k runs


@pytest.mark.parametrize("distance", ["manhattan", "Cosine", "EUCLIDEAN"])
def test_unknown_distance_is_refused(distance):
    x, y = concepts()
    with pytest.raises(
        ValueError, match=f"distance must be one of 'euclidean', 'cosine' \\(case-sensitive\\), got '{distance}'"
    ):
        concept_decodability(x, y, distance=distance)
    with pytest.raises(ValueError, match="distance must be one of"):
        ConceptDecodabilityMetric(distance=distance)
    with pytest.raises(ValueError, match="ConceptDecodability distance must be one of"):
        ConceptDecodability(distance=distance)


@pytest.mark.parametrize("scale", [1e-30, 1e20, 1e30])
def test_magnitude_changes_nothing(scale):
    # Squares of 1e20 overflow float32 and those of 1e-30 underflow it (CD at chance before); each layer is
    # now centred and scaled by a power of two first, so the answer is computed, not refused.
    x, y = concepts()
    assert knn_loo_predictions(x * scale, y).tolist() == sklearn_loo(x, y)


def test_callback_refuses_k_above_the_probe_set_before_training(tmp_path, capsys):
    cpu = config("configs/trainer/cpu.yaml", "configs/synthetic/cpu.yaml", "callbacks/concept_decodability.yaml")
    args = ["fit", *cpu, "--config", DEBUG, *TINY_SYNTHETIC, f"--trainer.default_root_dir={tmp_path}"]
    # The datamodule's default probe set: 5 prompts per concept, the callback's k = 10.
    with pytest.raises(SystemExit, match=r"ConceptDecodability k=10 is too large.*probe_per_concept.*at least 11"):
        main([*args, "--trainer.callbacks.probe_per_concept=null", "--data.init_args.probe_per_concept=5"])
    assert not (tmp_path / "checkpoints").exists() and not list(tmp_path.rglob("*.ckpt"))  # no step was taken
    # The callback's own probe set: refused when the callback is built.
    with pytest.raises(
        SystemExit, match=r"k=10 is too large.*set ConceptDecodability probe_per_concept to at least 11"
    ):
        main([*args, "--trainer.callbacks.probe_per_concept=4"])
    with pytest.raises(SystemExit):  # YAML / command line: jsonargparse's Literal check
        main([*args, "--trainer.callbacks.distance=Cosine"])
    assert "distance" in capsys.readouterr().err


def test_probe_refuses_impossible_k_and_patching_before_loading_the_model(tmp_path, monkeypatch):
    from lcd.lit.probe import LitProbe
    from lcd.models.hf import CausalLMSpec

    def load(self):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(LitProbe, "load", load)
    model_dir = save_tiny_lm(tmp_path / "model", "llama")
    args = [
        "validate",
        *config(
            "configs/llm/probe.yaml", "configs/llm/tasks/bitwise.yaml", "configs/debug.yaml", "configs/llm/debug.yaml"
        ),
    ]
    args += [f"--model.init_args.lm.name={model_dir}", f"--trainer.default_root_dir={tmp_path / 'run'}"]
    # configs/llm/debug.yaml: 11 prompts per class (Null too), so k = 11 is one too many.
    with pytest.raises(SystemExit, match=r"model k=11 is too large.*n_per_concept.*at most 10.*at least 12"):
        main([*args, "--model.init_args.k=11"])
    # patching settings that cannot work are refused before the model loads too
    with pytest.raises(SystemExit, match=r"patch_shots=10 is not among data eval_shots=\[1, 4\]"):
        main([*args, "--model.init_args.patch_shots=10"])
    with pytest.raises(SystemExit, match="negative patching needs the Null class"):
        main([*args, "--model.init_args.patch_shots=4", "--data.init_args.include_null=false"])
    with pytest.raises(ValueError, match="model distance must be one of"):
        LitProbe(lm=CausalLMSpec(str(model_dir)), distance="manhattan")


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


def test_loo_neighbours_are_the_float64_nearest_with_ties_to_the_lower_index():
    g = torch.Generator().manual_seed(0)
    x = 1e4 + torch.randn(60, 8, generator=g)  # a large shared offset, as in residual streams
    x[7] = x[3]  # a duplicate: distance ties
    idx = loo_neighbours(x, 5)
    d = torch.cdist(x.double(), x.double()).fill_diagonal_(float("inf"))
    expected = torch.stack([torch.tensor(sorted(range(60), key=lambda j: (d[i, j].item(), j))[:5]) for i in range(60)])
    assert torch.equal(idx.sort(-1).values, expected.sort(-1).values)
    assert 7 in idx[3].tolist() and 3 in idx[7].tolist() and (idx != torch.arange(60)[:, None]).all()
    cosine = loo_neighbours(x, 5, "cosine")
    assert cosine.shape == (60, 5) and (cosine != torch.arange(60)[:, None]).all()
