"""Batched capture and generation for LLMs: left padding, length order, the answer-end stop, oneDNN linears."""

from __future__ import annotations

import pytest
import torch
from tiny_lm import save_tiny_lm

from lcd.analysis.stats import linear_fit
from lcd.data.text import ICLTextDataModule, encode_prompts
from lcd.lit.generation import capture_and_generate, decode_answers, exact_match, greedy_generate, onednn_linears
from lcd.models.hf import load_causal_lm
from lcd.tasks import BitwiseTask, POSTask, make_prompts


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def tiny(request, tmp_path_factory):
    return load_causal_lm(str(save_tiny_lm(tmp_path_factory.mktemp(request.param), request.param)))


def test_capture_under_left_padding_matches_each_prompt_alone(tiny):
    model, tok = tiny.model, tiny.tokenizer
    prompts = [p.text for p in make_prompts(BitwiseTask(), 0, 1, concepts=[0])]
    prompts += [p.text for p in make_prompts(BitwiseTask(), 3, 2, concepts=[1])]  # longer: others get padded
    batch = tok(prompts, return_tensors="pt", padding=True)
    assert (batch["attention_mask"][:, 0] == 0).any()  # really left-padded
    feats, gen = capture_and_generate(model, batch["input_ids"], batch["attention_mask"], None, 4, tok.pad_token_id)
    assert feats.shape == (2, 3, 16) and gen.shape == (3, 4)
    for i, text in enumerate(prompts):
        alone = tok([text], return_tensors="pt")
        hs = model(**alone, output_hidden_states=True).hidden_states
        # hidden_states[l + 1] is block l's output; the last entry has the final norm applied, so compare block 0
        torch.testing.assert_close(feats[0, i], hs[1][0, -1], atol=1e-4, rtol=1e-4)
        ref = model.generate(**alone, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        assert torch.equal(gen[i], ref[0, alone["input_ids"].shape[1] :])


def test_capture_only_stops_early_and_generation_matches_plain_generate(tiny):
    model, tok = tiny.model, tiny.tokenizer
    batch = encode_prompts(tok, make_prompts(BitwiseTask(), 2, 2))
    hooks = [len(b._forward_hooks) for b in model.model.layers]  # transformers may keep its own
    ids, mask = batch["input_ids"], batch["attention_mask"]
    only, none = capture_and_generate(model, ids, mask, [0], 0)
    both, gen = capture_and_generate(model, ids, mask, [0], 6, tok.pad_token_id)
    torch.testing.assert_close(only, both)
    assert none.shape == (ids.shape[0], 0)
    assert torch.equal(gen, greedy_generate(model, ids, mask, 6, tok.pad_token_id))
    assert [len(b._forward_hooks) for b in model.model.layers] == hooks  # ours are all gone


def test_answers_are_cut_at_the_newline_and_matched_exactly():
    class Tok:
        def batch_decode(self, ids, skip_special_tokens=True):
            return [" 00100\nInput", "0010", " noun "]

    assert decode_answers(Tok(), torch.zeros(3, 1)) == ["00100", "0010", "noun"]
    assert exact_match(["00100", "0010", "noun"], ["00100", "00100", "noun"]).tolist() == [True, False, True]


def test_linear_fit_r2():
    slope, intercept, r2 = linear_fit([0.1, 0.5, 0.9], [0.2, 1.0, 1.8])
    assert slope == pytest.approx(2) and intercept == pytest.approx(0) and r2 == pytest.approx(1)
    assert linear_fit([0.0, 1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 1.0])[2] == pytest.approx(0)
    assert linear_fit([0.5, 0.5], [0.1, 0.2])[2] != linear_fit([0.5, 0.5], [0.1, 0.2])[2]  # nan: constant x


def test_length_sorted_batches_give_each_prompt_the_same_results(tiny):
    model, tok = tiny.model, tiny.tokenizer
    dm = ICLTextDataModule(POSTask(n_sentences=100), eval_shots=[2], n_per_concept=3, eval_batch_size=4)
    dm.set_tokenizer(tok)
    prompts = dm.eval_prompts(2)  # 21 prompts of mixed byte lengths, grouped by concept

    def run(by_length: bool):
        feats, gens, index, computed = [], [], [], 0
        for b in dm.loader(prompts, by_length=by_length):
            f, g = capture_and_generate(model, b["input_ids"], b["attention_mask"], None, 3, tok.pad_token_id)
            feats.append(f)
            gens += list(g)
            index.append(b["index"])
            computed += b["input_ids"].numel()
        index = torch.cat(index)
        order = index.argsort()
        return torch.cat(feats, 1)[:, order], [gens[i] for i in order.tolist()], index, computed

    sorted_f, sorted_g, sorted_index, sorted_cost = run(True)
    given_f, given_g, given_index, given_cost = run(False)
    assert given_index.tolist() == list(range(len(prompts)))
    assert sorted(sorted_index.tolist()) == list(range(len(prompts))) and sorted_index.tolist() != list(range(21))
    lengths = [len(tok(prompts[i].text)["input_ids"]) for i in sorted_index.tolist()]
    assert lengths == sorted(lengths, reverse=True)  # longest first: neighbours share a batch
    assert sorted_cost < given_cost  # less padding computed
    torch.testing.assert_close(sorted_f, given_f, atol=1e-4, rtol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(sorted_g, given_g, strict=True))


def test_generation_stops_once_every_row_ended_its_answer(tiny):
    model, tok = tiny.model, tiny.tokenizer
    batch = encode_prompts(tok, make_prompts(BitwiseTask(), 2, 1))  # 7 prompts
    ids, mask, pad = batch["input_ids"], batch["attention_mask"], tok.pad_token_id
    plain = greedy_generate(model, ids, mask, 8, pad)  # (7, 8)
    for step in (2, 0):  # declare every row's token at `step` an answer end: all rows end by then
        stop = plain[:, step].unique()
        ends = [next(i for i, t in enumerate(ref.tolist()) if t in stop.tolist()) for ref in plain]
        # the probe's capture+generate and the plain generation that patching and finetuning use
        for gen in (
            capture_and_generate(model, ids, mask, None, 8, pad, stop)[1],
            greedy_generate(model, ids, mask, 8, pad, stop),
        ):
            assert gen.shape == (7, max(ends) + 1)  # stopped as soon as the last row ended, not after 8 tokens
            for row, ref, end in zip(gen, plain, ends, strict=True):
                assert torch.equal(row[: end + 1], ref[: end + 1]) and (row[end + 1 :] == pad).all()


def test_onednn_linears_agree_with_the_default_and_always_restore(tiny):
    model, tok = tiny.model, tiny.tokenizer
    batch = encode_prompts(tok, make_prompts(BitwiseTask(), 3, 1))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ref_f, ref_g = capture_and_generate(model, ids, mask, None, 4, tok.pad_token_id, fast_linear=False)
    fast_f, fast_g = capture_and_generate(model, ids, mask, None, 4, tok.pad_token_id)
    torch.testing.assert_close(fast_f, ref_f, atol=1e-5, rtol=1e-5)
    assert torch.equal(fast_g, ref_g)
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad(), onednn_linears(model) as n:
        if torch.backends.mkldnn.is_available():  # this project's CPU builds have it
            assert n == len(linears) and all("forward" in vars(m) for m in linears)
        raise RuntimeError("boom")
    assert not any("forward" in vars(m) for m in model.modules())  # every original forward is back
    with onednn_linears(model) as n:  # gradients on: nothing is rerouted
        assert n == 0
