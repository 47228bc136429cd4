"""Mean-activation patching: only the meant position and layer change; means and values; both model kinds."""

from __future__ import annotations

import pytest
import torch
from tiny_lm import save_tiny_lm

from lcd import patching
from lcd.activations import capture_residual, find_decoder_layers, last_token_positions
from lcd.data import fixed_batches
from lcd.data.text import encode_prompts
from lcd.lit.generation import answer_budget, capture_and_generate, decode_answers, exact_match
from lcd.models import ICLTransformer
from lcd.models.hf import load_causal_lm
from lcd.patching import class_means, llm_patching, patch_value, patched, synthetic_patching_matrix
from lcd.tasks import BitwiseTask, SparseRegressionTask, make_prompts


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_causal_lm(str(save_tiny_lm(tmp_path_factory.mktemp("llama"), "llama")))


def _all_positions(model, ids, mask):
    with capture_residual(model, None, None) as cap:
        model(input_ids=ids, attention_mask=mask)
    return cap.stacked()  # (L, B, T, d)


@pytest.mark.parametrize("mode", ["replace", "add"])
def test_patching_changes_the_hidden_state_only_where_meant(tiny, mode):
    model, tok = tiny.model, tiny.tokenizer
    batch = tok(["Input: 01101 10110\nOutput:", "Input: 1\nOutput:"], return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    hooks = [len(b._forward_hooks) for b in find_decoder_layers(model)]  # transformers may keep its own
    clean = _all_positions(model, ids, mask)
    pos = torch.tensor([10, 12])
    value = torch.randn(2, 16)
    with patched(model, 0, pos, value, mode):
        dirty = _all_positions(model, ids, mask)
    rows = torch.arange(2)
    expected = value if mode == "replace" else clean[0, rows, pos] + value
    torch.testing.assert_close(dirty[0, rows, pos], expected)
    changed = (dirty - clean).abs().amax(-1) > 1e-6  # (L, B, T)
    for b, p in enumerate(pos.tolist()):
        assert changed[0, b].nonzero().flatten().tolist() == [p]  # patched layer: that token only
        assert not changed[:, b, :p].any()  # causal: nothing before the patched token moves
        assert changed[1, b, p]  # later layers see it
    assert [len(b._forward_hooks) for b in find_decoder_layers(model)] == hooks


def test_class_means_and_patch_values():
    feats = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0]])
    means = class_means(feats, torch.tensor([0, 0, 1, 1]), 2)
    torch.testing.assert_close(means, torch.tensor([[2.0, 0.0], [0.0, 3.0]]))
    torch.testing.assert_close(patch_value(means, torch.tensor([1, 0])), torch.tensor([[0.0, 3.0], [2.0, 0.0]]))
    torch.testing.assert_close(patch_value(means, torch.tensor([0]), "add"), torch.tensor([[1.0, -1.5]]))
    with pytest.raises(ValueError, match=r"classes \[2\]"):
        class_means(feats, torch.tensor([0, 0, 1, 1]), 3)


def test_llm_patching_reports_accuracy_per_concept(tiny, monkeypatch):
    task = BitwiseTask()
    means = [encode_prompts(tiny.tokenizer, make_prompts(task, 1, 2, split="train"))]
    evals = [encode_prompts(tiny.tokenizer, make_prompts(task, 1, 3))]
    applied = []  # (layer, positions, value, mode) of every patch: a random tiny model's answers never change
    real_patch = patching.patch_residual
    monkeypatch.setattr(patching, "patch_residual", lambda m, *args: applied.append(args) or real_patch(m, *args))
    out = llm_patching(tiny.model, tiny.tokenizer, means, evals, layer=-1, null_id=6)
    assert out.layer == 1 and out.base.shape == out.positive.shape == out.negative.shape == (6,)
    assert out.n.tolist() == [3.0] * 6
    # positive: each prompt's own class mean at the last prompt token of layer 1; negative: the Null mean
    feats, _ = capture_and_generate(tiny.model, means[0]["input_ids"], means[0]["attention_mask"], [1])
    expected = class_means(feats[0], means[0]["concept"], 7)
    keep = evals[0]["concept"] < 6
    positions = last_token_positions(evals[0]["attention_mask"][keep])
    assert [(layer, mode) for layer, _, _, mode in applied] == [(1, "replace"), (1, "replace")]
    for (_, where, value, _), source in zip(applied, [evals[0]["concept"][keep], torch.full((18,), 6)], strict=True):
        assert torch.equal(where, positions)
        torch.testing.assert_close(value, expected[source])
    # the unpatched baseline (plain generate) agrees with the probe's capture+generate path
    batch = evals[0]
    keep = batch["concept"] < 6
    budget = answer_budget(tiny.tokenizer, batch["answers"])
    _, gen = capture_and_generate(tiny.model, batch["input_ids"], batch["attention_mask"], [0], budget, 0)
    correct = exact_match(decode_answers(tiny.tokenizer, gen), batch["answers"]).float()[keep]
    per_concept = torch.zeros(6).index_add_(0, batch["concept"][keep], correct) / 3
    torch.testing.assert_close(out.base, per_concept)
    given = llm_patching(tiny.model, tiny.tokenizer, means, evals, layer=-1, null_id=6, base=torch.ones(6))
    assert given.base.tolist() == [1.0] * 6 and torch.equal(given.positive, out.positive)
    with pytest.raises(ValueError, match="out of range"):
        llm_patching(tiny.model, tiny.tokenizer, means, evals, layer=2, null_id=6)


def test_synthetic_matrix_own_mean_of_identical_prompts_changes_nothing():
    torch.manual_seed(0)
    task = SparseRegressionTask(n_dims=8, n_concepts=4, rank=2, n_pairs=6)
    net = ICLTransformer(n_dims=8, n_pairs=6, n_layers=3, d_model=16, n_heads=2).eval()
    one = task.sample(4, torch.Generator().manual_seed(1), concept=torch.arange(4))
    # each concept: one prompt repeated, so its mean activation *is* each of its activations (11 copies: the CD
    # reported beside the matrix is leave-one-out 10-NN, which needs more than 10 points per concept)
    same = {k: v.repeat_interleave(11, 0) for k, v in one.items()}
    result = synthetic_patching_matrix(net, [same], [same], n_concepts=4, layer=1)
    assert result.delta.shape == (4, 4) and result.layer == 1
    assert result.delta.diagonal().abs().max() < 1e-5
    off = result.delta[~torch.eye(4, dtype=torch.bool)]
    assert (off.abs() > 1e-6).all()  # another basis's mean does move the query prediction
    with torch.no_grad():
        direct = ((net(same["xs"], same["ys"])[:, -1] - same["ys"][:, -1]) ** 2).view(4, 11).mean(1)
    torch.testing.assert_close(result.base, direct)


def test_synthetic_matrix_defaults_to_the_best_cd_layer():
    task = SparseRegressionTask(n_dims=8, n_concepts=4, rank=2, n_pairs=6)
    net = ICLTransformer(n_dims=8, n_pairs=6, n_layers=3, d_model=16, n_heads=2).eval()
    probe = fixed_batches(task, 12, seed=0, stream=2, batch_size=24)
    val = fixed_batches(task, 5, seed=0, stream=1, batch_size=20)
    result = synthetic_patching_matrix(net, probe, val, n_concepts=4, mode="add")
    assert result.layer == int(result.cd.argmax()) and result.cd.shape == (3,)
    assert torch.isfinite(result.delta).all()


def test_patch_synthetic_command_on_a_fitted_run(tmp_path):
    from conftest import DEBUG, TINY_SYNTHETIC, config

    from lcd.analysis import patch_matrix
    from lcd.cli import main

    fit = ["fit", *config("configs/trainer/cpu.yaml", "configs/synthetic/cpu.yaml"), "--config", DEBUG]
    main([*fit, *TINY_SYNTHETIC, f"--trainer.default_root_dir={tmp_path}"])
    (cfg,) = tmp_path.rglob("config.yaml")
    (ckpt,) = tmp_path.rglob("last.ckpt")
    out = tmp_path / "patching"
    result = patch_matrix.main(["--config", str(cfg), "--ckpt", str(ckpt), "--layer", "-1", "--out", str(out)])
    assert result.layer == 1 and result.delta.shape == (4, 4)
    rows = (out / "patching_matrix.csv").read_text().splitlines()
    assert len(rows) == 1 + 16 and rows[1].startswith("1,replace,")
    assert (out / "plots" / "patching_matrix.png").is_file()
    with pytest.raises(SystemExit, match="does not exist"):
        patch_matrix.main(["--config", str(tmp_path / "missing.yaml")])
