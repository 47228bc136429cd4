"""Throughput of lcd's batched LLM probe vs a naive one-prompt-at-a-time loop, on real EWT 10-shot POS prompts.

Prompts: 10-shot POS prompts from the UD English EWT split shipped with lcd (``POSTask()``; ~390 tokens each on
Gemma's tokenizer), concepts and Null mixed as the probe serves them, on Gemma 3 270M (float32, CPU).

- lcd: the probe's own path. ``ICLTextDataModule.loader`` serves the prompts longest first, so each
  left-padded batch holds neighbours in length; :func:`lcd.lit.generation.capture_and_generate` runs one
  forward per batch with :mod:`lcd.activations` hooks keeping every layer at the last prompt token, logits
  at the last position only, and the same pass filling the KV cache from which the greedy answer
  continues until every row has ended its answer with a line break.
- naive: per prompt, ``model(ids, output_hidden_states=True)`` (every layer at every position, and logits
  over the 262K vocabulary at every position), the last token taken from each layer, then a separate
  greedy ``model.generate`` of the answer (``answer_budget`` tokens).

The naive loop runs on every ``--naive-every``-th prompt (it takes ~10 s a prompt); both rates are per
prompt and per real token, so the ratio is taken on the same kind of prompts. Times are wall and CPU
seconds of this process (the CPU ratio is the steadier one while other jobs share the cores).
``--breakdown`` also times lcd with each of its choices undone (default MKL linears, the given prompt
order, no stop at the answer's line break) and all three undone. The features of both must agree on the
shared prompts (asserted; the last layer differs by design: hidden_states applies the final norm); the
answers and their exact-match scores are compared and reported. Targets (issue 20): lcd >= 4x naive,
padding <= 15% of the tokens lcd computes. Use one thread count for both (``OMP_NUM_THREADS``; 1 on a shared machine).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/probe_throughput.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/probe_throughput.py --n-prompts 64 --naive-every 4 --breakdown
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from lcd.data.text import ICLTextDataModule, encode_prompts
from lcd.lit.generation import (
    answer_budget,
    answer_end_token_ids,
    capture_and_generate,
    decode_answers,
)
from lcd.models.hf import load_causal_lm
from lcd.tasks import POSTask


def naive(model, tok, prompts) -> tuple[torch.Tensor, list[str], int]:
    """Features (L, N, d), answers and real tokens of the one-prompt-at-a-time loop."""
    feats, answers, tokens = [], [], 0
    for p in prompts:
        one = encode_prompts(tok, [p])  # the same token ids as the batched path, unpadded
        enc = {"input_ids": one["input_ids"], "attention_mask": one["attention_mask"]}
        hs = model(**enc, output_hidden_states=True).hidden_states  # (L + 1) x (1, T, d)
        feats.append(torch.stack([h[0, -1] for h in hs[1:]]))
        budget = answer_budget(tok, [p.answer])
        out = model.generate(**enc, max_new_tokens=budget, do_sample=False, pad_token_id=tok.pad_token_id)
        answers += decode_answers(tok, out[:, enc["input_ids"].shape[1] :])
        tokens += enc["input_ids"].shape[1]
    return torch.stack(feats, 1), answers, tokens


def lcd_path(model, tok, loader, stop_ids, fast_linear: bool = True) -> tuple[torch.Tensor, list[str], int, int]:
    """Features (L, N, d) and answers in prompt order, real tokens and tokens computed (padding included)."""
    feats, answers, index, tokens, computed = [], [], [], 0, 0
    for b in loader:
        budget = answer_budget(tok, b["answers"])
        ids, mask, pad = b["input_ids"], b["attention_mask"], tok.pad_token_id
        f, gen = capture_and_generate(model, ids, mask, None, budget, pad, stop_ids, fast_linear)
        feats.append(f)
        answers += decode_answers(tok, gen)
        index.append(b["index"])
        tokens += int(b["attention_mask"].sum())
        computed += b["attention_mask"].numel()
    order = torch.cat(index).argsort()
    return torch.cat(feats, 1)[:, order], [answers[i] for i in order.tolist()], tokens, computed


def padding(dm: ICLTextDataModule, prompts, by_length: bool) -> float:
    """Share of the tokens computed that are padding, for batches served with or without length order."""
    real = total = 0
    for b in dm.loader(prompts, by_length=by_length):
        real, total = real + int(b["attention_mask"].sum()), total + b["attention_mask"].numel()
    return 1 - real / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--conllu", default=None, help="a CoNLL-U corpus (default: the shipped UD English EWT)")
    parser.add_argument("--n-prompts", type=int, default=64)
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--naive-every", type=int, default=4, help="the naive loop runs on every n-th prompt")
    parser.add_argument(
        "--breakdown", action="store_true", help="also time lcd without oneDNN linears, and in the given order"
    )
    args = parser.parse_args()
    lm = load_causal_lm(args.model)
    model, tok = lm.model, lm.tokenizer
    task = POSTask(conllu_path=args.conllu)
    per = -(-args.n_prompts // (task.n_concepts + 1))  # ceil: every class present
    dm = ICLTextDataModule(task, eval_shots=[args.shots], n_per_concept=per, eval_batch_size=args.batch_size)
    dm.set_tokenizer(tok)
    prompts = dm.eval_prompts(args.shots)[: args.n_prompts]  # every class, lengths mixed as in the probe
    shared = list(range(0, len(prompts), args.naive_every))
    stop_ids = answer_end_token_ids(tok)  # once per run (the probe does it in setup)
    threads = torch.get_num_threads()
    print(
        f"{args.model}: {lm.n_layers} layers; {len(prompts)} EWT {args.shots}-shot prompts "
        f"(naive on {len(shared)}); batch {args.batch_size}; {threads} threads "
        f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}); load {os.getloadavg()[0]:.2f}"
    )
    with torch.inference_mode():
        naive(model, tok, prompts[:1])  # warm-up
        (fl, al, tokens, computed), tl, cl = timed(lcd_path, model, tok, dm.loader(prompts), stop_ids)
        (fn, an, tokens_n), tn, cn = timed(naive, model, tok, [prompts[i] for i in shared])
        variants = {}
        if args.breakdown:  # lcd with one of its choices undone; the last row undoes all three
            for label, loader, stop, fast in [
                ("lcd with default (MKL) linears", dm.loader(prompts), stop_ids, False),
                ("lcd in the given prompt order", dm.loader(prompts, by_length=False), stop_ids, True),
                ("lcd without the answer-end stop", dm.loader(prompts), None, True),
                ("given order, MKL, no stop", dm.loader(prompts, by_length=False), None, False),
            ]:
                variants[label] = timed(lcd_path, model, tok, loader, stop, fast)[1:]
    torch.testing.assert_close(fl[:-1, shared], fn[:-1], atol=2e-2, rtol=1e-3)
    gold = [prompts[i].answer for i in shared]
    same_text = sum(al[i] == a for i, a in zip(shared, an, strict=True))
    same_score = sum((al[i] == g) == (a == g) for i, a, g in zip(shared, an, gold, strict=True))
    n, n_n = len(prompts), len(shared)
    print(f"mean prompt length {tokens / n:.0f} tokens; times are wall (CPU) seconds")
    print(
        f"  answers of the shared prompts: {same_text}/{n_n} identical texts, {same_score}/{n_n} identical exact-match "
        "scores (the naive loop's budget is each prompt's own answer, lcd's its batch's longest: a wrong answer may "
        "be cut at another length)"
    )
    print(f"  lcd:   {n / tl:6.3f} prompts/s  {tokens / tl:7.1f} tokens/s  {tl:7.1f} s ({cl:.1f})")
    print(f"  naive: {n_n / tn:6.3f} prompts/s  {tokens_n / tn:7.1f} tokens/s  {tn:7.1f} s ({cn:.1f})")
    for label, (t, c) in variants.items():
        print(f"  {label}: {n / t:6.3f} prompts/s {t:7.1f} s ({c:.1f}); lcd {t / tl:.2f}x wall, {c / cl:.2f}x CPU")
    print(
        f"  speed-up: {(n / tl) / (n_n / tn):.2f}x in prompts/s, {(tokens / tl) / (tokens_n / tn):.2f}x in tokens/s, "
        f"{(n / cl) / (n_n / cn):.2f}x in prompts per CPU second (target >= 4x)"
    )
    print(
        f"  padding: {1 - tokens / computed:.1%} of the tokens lcd computed (target <= 15%); "
        f"{padding(dm, prompts, by_length=False):.1%} in the given prompt order"
    )


def timed(f, *args):
    """``f(*args)``, its wall time and the CPU time of this process (less sensitive to other jobs)."""
    t, c = time.perf_counter(), time.process_time()
    out = f(*args)
    return out, time.perf_counter() - t, time.process_time() - c


if __name__ == "__main__":
    main()
