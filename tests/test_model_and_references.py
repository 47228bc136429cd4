import pytest
import torch

from lcd.lit.pretrain import LitPretrain
from lcd.models import ICLTransformer
from lcd.tasks import SparseRegressionTask
from lcd.tasks.synthetic.references import lasso_predictions, least_squares_predictions


def tiny(n_dims: int = 4, n_pairs: int = 6, y_slot: str = "first") -> ICLTransformer:
    torch.manual_seed(0)
    return ICLTransformer(n_dims=n_dims, n_pairs=n_pairs, n_layers=2, d_model=16, n_heads=2, y_slot=y_slot).eval()


def test_paper_preset_has_about_9_5m_parameters():
    n = sum(p.numel() for p in ICLTransformer(n_dims=16, n_pairs=20, n_layers=12, d_model=256, n_heads=8).parameters())
    assert 9.3e6 < n < 9.7e6, n


def test_init_scales_are_configurable():
    torch.manual_seed(0)
    default = ICLTransformer(n_dims=4, n_pairs=16, n_layers=2, d_model=64, n_heads=2)
    torch.manual_seed(0)
    wide = ICLTransformer(n_dims=4, n_pairs=16, n_layers=2, d_model=64, n_heads=2, init_std=0.1, pos_init_std=0.5)
    q_default = default.backbone.h[0].attn.c_attn.weight.std().item()
    q_wide = wide.backbone.h[0].attn.c_attn.weight.std().item()
    assert abs(q_default - 0.02) < 0.002 and abs(q_wide - 0.1) < 0.01, (q_default, q_wide)
    assert abs(default.backbone.wpe.weight.std().item() - 0.02) < 0.004
    assert abs(wide.backbone.wpe.weight.std().item() - 0.5) < 0.05
    for bad in ({"init_std": 0.0}, {"pos_init_std": -1.0}):
        with pytest.raises(ValueError, match="must be > 0"):
            ICLTransformer(n_dims=4, n_pairs=4, n_layers=1, d_model=8, n_heads=2, **bad)


@pytest.mark.parametrize("y_slot", ["first", "own", "all"])
def test_y_slot_places_y_in_its_own_coordinate(y_slot):
    torch.manual_seed(0)
    net = ICLTransformer(n_dims=3, n_pairs=2, n_layers=1, d_model=8, n_heads=2, y_slot=y_slot)
    xs, ys = torch.randn(4, 2, 3), torch.randn(4, 2)
    tokens = net.embed_tokens(xs, ys)
    y_cols = {"first": [0], "own": [3], "all": [0, 1, 2]}[y_slot]
    assert tokens.shape == (4, 4, 3 + (y_slot == "own")) and net.read_in.in_features == tokens.shape[-1]
    torch.testing.assert_close(tokens[:, 0::2, :3], xs)  # x tokens hold x in the first D coordinates
    for col in y_cols:
        torch.testing.assert_close(tokens[:, 1::2, col], ys)
    others = torch.ones(tokens.shape[-1], dtype=torch.bool)
    others[y_cols] = False
    assert not tokens[:, 1::2, others].any()  # y tokens are zero elsewhere
    if y_slot == "own":
        assert not tokens[:, 0::2, 3].any()  # and x tokens are zero in the y coordinate
    assert net(xs, ys).shape == (4, 2)
    with pytest.raises(ValueError, match="y_slot"):
        ICLTransformer(n_dims=3, n_pairs=2, n_layers=1, d_model=8, n_heads=2, y_slot="last")


@pytest.mark.parametrize("y_slot", ["first", "own", "all"])
def test_model_is_causal(y_slot):
    model = tiny(y_slot=y_slot)
    xs, ys = torch.randn(3, 6, 4), torch.randn(3, 6)
    base = model(xs, ys)
    i = 2  # predictions 0..i must not see x_{i+1..} nor y_{i..}
    xs2, ys2 = xs.clone(), ys.clone()
    xs2[:, i + 1 :] += 5.0
    ys2[:, i:] -= 5.0
    out = model(xs2, ys2)
    torch.testing.assert_close(out[:, : i + 1], base[:, : i + 1])
    assert not torch.allclose(out[:, i + 1 :], base[:, i + 1 :])  # later ones do see them


def test_prediction_i_uses_earlier_labels():
    model = tiny()
    xs, ys = torch.randn(2, 6, 4), torch.randn(2, 6)
    ys2 = ys.clone()
    ys2[:, 1] += 3.0
    changed = (model(xs, ys2) - model(xs, ys)).abs().amax(0) > 1e-6
    assert changed.tolist() == [False, False, True, True, True, True]


def test_loss_counts_y_predictions_only():
    module = LitPretrain(tiny())
    batch = SparseRegressionTask(n_dims=4, n_concepts=2, rank=2, n_pairs=6).sample(5, torch.Generator().manual_seed(0))
    base = module.squared_errors(batch)
    assert base.shape == (5, 6)

    # Wreck the backbone output at every y token: the loss must not move.
    def hook(mod, args, out):
        h = out.last_hidden_state.clone()
        h[:, 1::2] = 1e3
        out.last_hidden_state = h
        return out

    handle = module.net.backbone.register_forward_hook(hook)
    try:
        torch.testing.assert_close(module.squared_errors(batch), base)
    finally:
        handle.remove()

    # ... while wrecking the x tokens does move it.
    def hook_x(mod, args, out):
        out.last_hidden_state = out.last_hidden_state + 1.0
        return out

    handle = module.net.backbone.register_forward_hook(hook_x)
    try:
        assert not torch.allclose(module.squared_errors(batch), base)
    finally:
        handle.remove()


@pytest.mark.slow  # torch.compile
def test_compiled_training_step_matches_the_plain_one():
    batch = SparseRegressionTask(n_dims=4, n_concepts=2, rank=2, n_pairs=6).sample(8, torch.Generator().manual_seed(0))
    modules = {flag: LitPretrain(tiny().train(), compile=flag) for flag in (False, True)}
    losses, grads = {}, {}
    for flag, module in modules.items():
        losses[flag] = module.training_step(batch, 0)
        losses[flag].backward()
        grads[flag] = {name: p.grad for name, p in module.named_parameters() if p.requires_grad}
    assert modules[False]._compiled_forward is None and modules[True]._compiled_forward is not None
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-5, atol=1e-6)
    assert grads[True].keys() == grads[False].keys()
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-4, atol=1e-6)
    # Compiling wraps a bound method, so the checkpoint keys stay those of the plain module.
    assert modules[True].state_dict().keys() == modules[False].state_dict().keys()


def test_true_basis_least_squares_is_exact_after_r_pairs():
    task = SparseRegressionTask(n_dims=8, n_concepts=4, rank=2, n_pairs=12, noise_var=0.0)
    batch = task.sample(64, torch.Generator().manual_seed(0))
    err_true = (least_squares_predictions(batch["xs"], batch["ys"], batch["mask"]) - batch["ys"]) ** 2
    err_full = (least_squares_predictions(batch["xs"], batch["ys"]) - batch["ys"]) ** 2
    assert err_true[:, 2:].max() < 1e-8  # r = 2 examples suffice with the basis
    assert err_true[:, 1].mean() > 1e-2  # one example does not
    assert err_full[:, 2:8].mean() > 1e-2  # without the basis, fewer than D = 8 examples are not enough
    assert err_full[:, 8:].max() < 1e-8  # D examples are


def test_lasso_sits_between_the_two():
    task = SparseRegressionTask(n_dims=8, n_concepts=4, rank=2, n_pairs=8, noise_var=0.0)
    batch = task.sample(16, torch.Generator().manual_seed(1))
    err = (lasso_predictions(batch["xs"], batch["ys"], alpha=0.01) - batch["ys"]) ** 2
    err_full = (least_squares_predictions(batch["xs"], batch["ys"]) - batch["ys"]) ** 2
    assert err[:, 5:8].mean() < 0.5 * err_full[:, 5:8].mean()
