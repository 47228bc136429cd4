import pytest
import torch

from lcd.tasks import FunctionMixtureTask, SparseRegressionTask, make_bases


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_orthogonal_bases_partition_dims():
    masks = make_bases(16, 4, 4)
    assert masks.shape == (4, 16)
    assert masks.sum(0).tolist() == [1] * 16  # every dim in exactly one basis
    assert masks.sum(1).tolist() == [4] * 4


def test_overlapping_bases_share_within_group_only():
    masks = make_bases(16, 8, 4, "overlapping", n_groups=2)
    overlap = masks.float() @ masks.float().T  # shared dims per pair
    assert (overlap[:4, 4:] == 0).all() and (overlap[4:, :4] == 0).all()
    assert overlap[0, 1] > 0 and overlap[4, 5] > 0
    assert masks[:4, 8:].sum() == 0 and masks[4:, :8].sum() == 0
    assert len({tuple(m.tolist()) for m in masks}) == 8


def test_explicit_bases():
    masks = make_bases(6, 0, 0, "explicit", index_sets=[[0, 1], [2], [3, 4, 5]])
    assert masks.sum(1).tolist() == [2, 1, 3]


def test_weights_respect_masks_and_labels_follow_them():
    task = SparseRegressionTask(n_dims=8, n_concepts=4, rank=2, n_pairs=5, noise_var=0.0)
    batch = task.sample(256, gen())
    mask = task.masks[batch["concept"]]
    assert (batch["weights"][~mask] == 0).all()
    assert (batch["weights"][mask] != 0).all()
    expected = torch.einsum("bnd,bd->bn", batch["xs"], batch["weights"])
    torch.testing.assert_close(batch["ys"], expected)


def test_noise_has_the_configured_variance():
    task = SparseRegressionTask(n_dims=8, n_concepts=4, rank=2, n_pairs=20, noise_var=0.25)
    batch = task.sample(2000, gen())
    resid = batch["ys"] - torch.einsum("bnd,bd->bn", batch["xs"], batch["weights"])
    assert abs(resid.var().item() - 0.25) < 0.02


def test_concept_ids_are_uniform():
    task = SparseRegressionTask()
    counts = torch.bincount(task.sample(40_000, gen())["concept"], minlength=4).float()
    assert ((counts / 10_000 - 1).abs() < 0.05).all(), counts


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_dims": 8, "n_concepts": 4, "rank": 3}, "n_concepts \\* rank <= n_dims"),
        ({"rank": 0}, "rank must be >= 1"),
        ({"n_pairs": 0}, "n_pairs must be >= 1"),
        ({"noise_var": -1.0}, "variance"),
        ({"n_concepts": 1}, "n_concepts must be >= 2"),
        ({"bases": "overlapping", "n_dims": 15, "n_concepts": 8}, "divisible by n_groups"),
        ({"bases": "explicit", "n_dims": 4, "index_sets": [[0, 9]]}, "outside \\[0, 4\\)"),
    ],
)
def test_impossible_settings_fail_with_a_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SparseRegressionTask(**kwargs)


def test_function_mixture_families():
    task = FunctionMixtureTask(n_dims=6, n_pairs=10, noise_var=0.0, sparsity=2)
    concept = task.balanced_concepts(50)
    batch = task.sample(len(concept), gen(1), concept=concept)
    xs, ys, w = batch["xs"], batch["ys"], batch["weights"]
    u = torch.einsum("bnd,bd->bn", xs, w)
    rows = {name: concept == k for k, name in enumerate(task.concept_names)}
    torch.testing.assert_close(ys[rows["linear"]], u[rows["linear"]])
    torch.testing.assert_close(ys[rows["sparse_linear"]], u[rows["sparse_linear"]])
    assert ((w[rows["sparse_linear"]] != 0).sum(1) == 2).all()
    torch.testing.assert_close(ys[rows["leaky_relu"]], torch.nn.functional.leaky_relu(u[rows["leaky_relu"]], 0.1))
    quad = torch.einsum("bnd,bd->bn", xs**2, w) / 3**0.5
    torch.testing.assert_close(ys[rows["quadratic"]], quad[rows["quadratic"]])
    with pytest.raises(ValueError, match="distinct"):
        FunctionMixtureTask(families=["linear", "linear"])
