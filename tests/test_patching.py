"""Mean-activation patching: only the meant position and layer change; means and values; both model kinds."""

from __future__ import annotations

import pytest
import torch
from tiny_lm import save_tiny_lm

from lcd import patching
from lcd.activations import capture_residual, find_decoder_layers, last_token_positions
from lcd.data import fixed_batches
from lcd.data.text import encode_prompts
from lcd.lit.generation import (
    answer_budget,
    capture_and_generate,
    decode_answers,
    exact_match,
    first_token_match,
    greedy_generate,
)
from lcd.models import ICLTransformer
from lcd.models.hf import load_causal_lm
from lcd.patching import class_means, llm_patching, patch_value, patched, synthetic_patching_matrix
from lcd.tasks import BitwiseTask, SparseRegressionTask, TextICLTask, make_prompts


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
    applied = []  # (layer, positions, value, mode, onward) of every patch: a random tiny model's answers never change
    real_patch = patching.patch_residual
    monkeypatch.setattr(
        patching,
        "patch_residual",
        lambda m, *args, **kw: applied.append((*args, kw.get("onward"))) or real_patch(m, *args, **kw),
    )
    out = llm_patching(
        tiny.model, tiny.tokenizer, means, evals, layers=[-1, 0], null_id=6, positions=["answer", "query"]
    )
    assert [(r.position, r.layer) for r in out] == [("answer", 0), ("answer", 1), ("query", 0), ("query", 1)]
    for r in out:
        assert r.base.shape == r.positive.shape == r.negative_first_token.shape == (6,)
        assert r.n.tolist() == [3.0] * 6
        assert (r.positive_first_token >= r.positive).all()  # right first token: necessary for an exact match
        torch.testing.assert_close(r.base, out[0].base)  # one unpatched pass, shared
    # positive: each prompt's own class mean at the last prompt token of the layer; negative: the Null mean;
    # the answer position patches onward from there (every generated token too)
    feats, _ = capture_and_generate(tiny.model, means[0]["input_ids"], means[0]["attention_mask"], [0, 1])
    keep = evals[0]["concept"] < 6
    positions = last_token_positions(evals[0]["attention_mask"][keep])
    sources = [evals[0]["concept"][keep], torch.full((18,), 6)]
    expected_runs = [(layer, onward) for onward in (True, False) for layer in (0, 1) for _ in sources]
    assert [(layer, onward) for layer, _, _, _, onward in applied] == expected_runs
    for i, (layer, where, value, mode, _) in enumerate(applied):
        assert torch.equal(where, positions) and mode == "replace"
        torch.testing.assert_close(value, class_means(feats[layer], means[0]["concept"], 7)[sources[i % 2]])
    # the unpatched baseline (plain generate) agrees with the probe's capture+generate path, both metrics
    batch = evals[0]
    keep = batch["concept"] < 6
    budget = answer_budget(tiny.tokenizer, batch["answers"])
    _, gen = capture_and_generate(tiny.model, batch["input_ids"], batch["attention_mask"], [0], budget, 0)
    correct = exact_match(decode_answers(tiny.tokenizer, gen), batch["answers"]).float()[keep]
    torch.testing.assert_close(out[0].base, torch.zeros(6).index_add_(0, batch["concept"][keep], correct) / 3)
    first = first_token_match(gen, batch["first_answer_id"]).float()[keep]
    torch.testing.assert_close(out[0].base_first_token, torch.zeros(6).index_add_(0, batch["concept"][keep], first) / 3)
    # the probe passes its own unpatched accuracy: the same results without the unpatched generation pass
    from lcd.lit import generation

    calls = []
    real_generate = generation.greedy_generate
    monkeypatch.setattr(generation, "greedy_generate", lambda *a, **kw: calls.append(1) or real_generate(*a, **kw))
    base = {"exact": out[0].base, "first_token": out[0].base_first_token}
    again = llm_patching(
        tiny.model, tiny.tokenizer, means, evals, layers=[-1, 0], null_id=6, positions=["answer", "query"], base=base
    )
    assert len(calls) == 2 * len(out)  # one batch: positive and negative per run, nothing unpatched
    for r, s in zip(out, again, strict=True):
        for field in ("base", "positive", "negative", "base_first_token", "positive_first_token", "n"):
            torch.testing.assert_close(getattr(s, field), getattr(r, field))
    with pytest.raises(ValueError, match="out of range"):
        llm_patching(tiny.model, tiny.tokenizer, means, evals, layers=2, null_id=6)
    with pytest.raises(ValueError, match="patch positions"):
        llm_patching(tiny.model, tiny.tokenizer, means, evals, layers=0, null_id=6, positions="everywhere")


class LetterTask(TextICLTask):
    """Answers of one character (one token of the byte tokenizer): the first or the last letter of a word."""

    words = [a + b + c for a in "abcdef" for b in "ghij" for c in "klmnop"]

    @property
    def concept_names(self) -> list[str]:
        return ["first", "last"]

    def split_items(self, split):
        return self.words[:100] if split == "train" else self.words[100:]

    def format_input(self, item):
        return item

    def answer(self, item, concept):
        return item[0] if concept == 0 else item[-1]

    def null_answer(self, item, rng):
        return rng.choice("abcdefghijklmnop")


def test_first_token_accuracy_equals_exact_match_for_one_token_answers(tiny):
    tok = tiny.tokenizer
    batch = encode_prompts(tok, make_prompts(LetterTask(), 2, 6))
    first = batch["first_answer_id"]
    assert tok.batch_decode(first[:, None]) == batch["answers"]  # the answer itself: one token, space in the prompt
    assert (batch["input_ids"][:, -1] == tok.convert_tokens_to_ids("Ġ")).all()  # prompts end with that space
    other = torch.tensor(tok.convert_tokens_to_ids(list("qrstuvwxyz")))
    wrong = other[torch.arange(len(first)) % len(other)]
    guess = torch.where(torch.arange(len(first)) % 3 == 0, wrong, first)  # a third wrong, the rest right
    newline = torch.full_like(first, tok.convert_tokens_to_ids("Ċ"))
    generated = torch.stack([guess, newline, wrong], 1)  # each answer ends after its one token
    hits = first_token_match(generated, first)
    assert hits.tolist() == exact_match(decode_answers(tok, generated), batch["answers"]).tolist()
    assert 0 < hits.sum() < len(hits)
    # five-digit answers: the first digit right is a first-token hit but no exact match
    bits = encode_prompts(tok, make_prompts(BitwiseTask(), 1, 1, concepts=[0]))
    digits = tok(bits["answers"], add_special_tokens=False, return_tensors="pt")["input_ids"]  # (1, 5)
    assert digits[0, 0] == bits["first_answer_id"][0]
    generated = torch.cat([digits[:, :1], other[:1, None], newline[:1, None]], 1)
    assert first_token_match(generated, bits["first_answer_id"]).tolist() == [True]
    assert exact_match(decode_answers(tok, generated), bits["answers"]).tolist() == [False]


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


@pytest.fixture
def planted(tmp_path):
    """A tiny LM whose last block drives its output: a residual along e_0 predicts '1', along e_1 predicts '0'."""
    lm = load_causal_lm(str(save_tiny_lm(tmp_path / "planted", "llama")))
    tok = lm.tokenizer
    one, zero = tok.convert_tokens_to_ids("1"), tok.convert_tokens_to_ids("0")
    with torch.no_grad():
        w = lm.model.lm_head.weight  # (V, 16), not tied to the embeddings in the tiny llama
        assert w.data_ptr() != lm.model.model.embed_tokens.weight.data_ptr()
        w[:, :2] = 0
        w[one, 0] = w[zero, 1] = 50.0
    means = torch.zeros(7, 16)
    means[:6, 0] = 10.0  # every concept's "mean" points to '1'
    means[6, 1] = 10.0  # Null's to '0'
    return lm, one, zero, {1: means}


def _bitwise_batch(tok):
    return encode_prompts(tok, make_prompts(BitwiseTask(), 2, 4, include_null=False))


def test_query_patch_sets_the_first_token_and_answer_patch_every_token(planted):
    lm, one, zero, means = planted
    model, tok = lm.model, lm.tokenizer
    batch = _bitwise_batch(tok)
    ids, mask, budget = batch["input_ids"], batch["attention_mask"], answer_budget(tok, batch["answers"])
    query, value = torch.full((ids.shape[0],), ids.shape[1] - 1), means[1][0]
    seen: list[torch.Tensor] = []  # the patched block's output in every forward (this hook runs after the patch)
    handle = model.model.layers[1].register_forward_hook(
        lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        with patched(model, 1, query, value, "replace", onward=True):
            every = greedy_generate(model, ids, mask, budget, tok.pad_token_id)
        prompt_pass, steps = seen[0], seen[1:]
        assert torch.equal(prompt_pass[:, -1], value.expand(len(ids), -1))  # the query
        assert not torch.isclose(prompt_pass[:, :-1], value).all(-1).any()  # nothing before it
        assert len(steps) == budget - 1 and all(torch.equal(h[:, -1], value.expand(len(ids), -1)) for h in steps)
        assert (every == one).all()  # every answer token was read from a patched position
        seen.clear()
        with patched(model, 1, query, value, "replace"):
            first = greedy_generate(model, ids, mask, budget, tok.pad_token_id)
        assert torch.equal(seen[0][:, -1], value.expand(len(ids), -1))
        assert not any(torch.isclose(h, value).all(-1).any() for h in seen[1:])  # generated tokens untouched
    finally:
        handle.remove()
    assert (first[:, 0] == one).all()
    # patching the last block's output leaves every key and value alone: the rest is the plain continuation
    forced = torch.cat([ids, first[:, :1]], 1)
    rest = greedy_generate(model, forced, torch.cat([mask, torch.ones_like(mask[:, :1])], 1), budget - 1, 0)
    assert torch.equal(first[:, 1:], rest)


def test_llm_patching_first_token_follows_a_planted_mean(planted):
    lm, one, zero, means = planted
    batch = _bitwise_batch(lm.tokenizer)
    out = llm_patching(lm.model, lm.tokenizer, None, [batch], 1, null_id=6, positions=["query", "answer"], means=means)
    gold_one = torch.tensor([a[0] == "1" for a in batch["answers"]]).float().view(6, 4).mean(1)  # per concept
    for r in out:
        torch.testing.assert_close(r.positive_first_token, gold_one)  # every first token is now '1'
        torch.testing.assert_close(r.negative_first_token, 1 - gold_one)  # the Null mean makes it '0'
    query, answer = out
    assert (answer.positive == 0).all() and (answer.negative == 0).all()  # "1111111" is never a five-digit answer
    assert (query.positive <= query.positive_first_token).all()
    assert (gold_one > 0).any() and (gold_one < 1).any()  # both signs measurably move the first token


def test_llm_patching_removes_its_hooks_when_generation_fails(tiny, monkeypatch):
    import lcd.lit.generation as generation

    model, tok = tiny.model, tiny.tokenizer
    blocks = find_decoder_layers(model)
    hooks = [len(b._forward_hooks) for b in blocks]
    calls, real = [], generation.greedy_generate

    def failing(*args, **kwargs):
        calls.append(len(blocks[0]._forward_hooks) - hooks[0])  # our patch hook is in place from the 2nd call on
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "greedy_generate", failing)
    batch = encode_prompts(tok, make_prompts(BitwiseTask(), 1, 2))
    means = {0: torch.zeros(7, 16)}
    with pytest.raises(RuntimeError, match="boom"):
        llm_patching(model, tok, None, [batch], 0, null_id=6, positions="answer", means=means)
    assert calls == [0, 1]  # the failure came while patched
    assert [len(b._forward_hooks) for b in blocks] == hooks
