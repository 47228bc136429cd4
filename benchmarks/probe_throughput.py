"""Throughput of the batched LLM probe vs a naive one-prompt-per-forward loop, same prompts and model.

Prompts: 4-shot bitwise prompts (default 32, all concepts and Null) on Gemma 3 270M (fp32, CPU).

- batched probe (lcd): left-padded batches; one forward per batch with :mod:`lcd.activations` hooks
  keeping every layer at the last prompt token only, the same pass filling the KV cache from which
  ``generate`` continues greedily (:func:`lcd.lit.generation.capture_and_generate`).
- naive: per prompt, ``model(..., output_hidden_states=True)`` (every layer, every position, and
  logits over the whole 262K vocabulary at every position), the last token taken from each layer,
  then a separate ``model.generate`` for the answer.

Both are also timed capture-only (no answer generation). The features of both must agree (asserted).
Target (issue 4): batched >= 4x naive in prompts per second.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/probe_throughput.py
"""

from __future__ import annotations

import argparse
import time

import torch

from lcd.data.text import encode_prompts
from lcd.lit.generation import answer_budget, capture_and_generate
from lcd.models.hf import load_causal_lm
from lcd.tasks import BitwiseTask, make_prompts


def naive(model, tok, prompts, generate: bool) -> torch.Tensor:
    feats = []
    for p in prompts:
        one = encode_prompts(tok, [p])  # the same token ids as the batched path, unpadded
        enc = {"input_ids": one["input_ids"], "attention_mask": one["attention_mask"]}
        hs = model(**enc, output_hidden_states=True).hidden_states  # (L + 1) x (1, T, d)
        feats.append(torch.stack([h[0, -1] for h in hs[1:]]))
        if generate:
            budget = answer_budget(tok, [p.answer])
            model.generate(**enc, max_new_tokens=budget, do_sample=False, pad_token_id=tok.pad_token_id)
    return torch.stack(feats, 1)  # (L, N, d)


def batched(model, tok, prompts, batch_size: int, generate: bool) -> torch.Tensor:
    feats = []
    for i in range(0, len(prompts), batch_size):
        b = encode_prompts(tok, prompts[i : i + batch_size])
        budget = answer_budget(tok, b["answers"]) if generate else 0
        f, _ = capture_and_generate(model, b["input_ids"], b["attention_mask"], None, budget, tok.pad_token_id)
        feats.append(f)
    return torch.cat(feats, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--n-prompts", type=int, default=32)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    lm = load_causal_lm(args.model)
    model, tok = lm.model, lm.tokenizer
    task = BitwiseTask()
    per = -(-args.n_prompts // (task.n_concepts + 1))  # ceil: every class present
    prompts = make_prompts(task, args.shots, per)[: args.n_prompts]
    n_threads = torch.get_num_threads()
    print(f"{args.model}: {lm.n_layers} layers, {len(prompts)} {args.shots}-shot prompts, {n_threads} threads")
    with torch.inference_mode():
        batched(model, tok, prompts[:2], 2, generate=True)  # warm-up
        results = {}
        for generate in (False, True):
            label = "capture + greedy answer" if generate else "capture only"
            t0 = time.perf_counter()
            fb = batched(model, tok, prompts, args.batch_size, generate)
            tb = time.perf_counter() - t0
            t0 = time.perf_counter()
            fn = naive(model, tok, prompts, generate)
            tn = time.perf_counter() - t0
            # the last layer differs by design (hidden_states applies the final norm); compare the rest
            torch.testing.assert_close(fb[:-1], fn[:-1], atol=2e-2, rtol=1e-3)
            results[label] = (len(prompts) / tb, len(prompts) / tn)
        for label, (b, n) in results.items():
            print(f"{label:>24}: batched {b:6.2f} prompts/s   naive {n:6.2f} prompts/s   speed-up {b / n:5.1f}x")


if __name__ == "__main__":
    main()
