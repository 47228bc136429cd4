"""Batched probing of a causal LM on left-padded ICL prompts: capture, greedy answers, exact match.

One forward pass over the prompt does both jobs: hooks from :mod:`lcd.activations` keep every
requested layer's residual stream at the last prompt token (the token before the answer), and the
same pass fills the KV cache from which ``model.generate`` continues greedily. The position ids of
that pass are the ones ``generate`` derives from the attention mask, so a left-padded row sees exactly
what it would see alone (tested against unpadded single-prompt runs).

Answers end at a line break (:data:`~lcd.tasks.text.prompts.ANSWER_END`): given the ids of the tokens that
contain one (:func:`answer_end_token_ids`), generation stops as soon as every row has ended its answer,
and a row that ended early is padded. Everything up to and including the line break is what greedy
generation without stopping produces, so :func:`decode_answers` reads the same answers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cache

import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList

from lcd.activations import capture_residual, last_token_positions
from lcd.tasks.text.prompts import ANSWER_END

__all__ = [
    "answer_budget",
    "answer_end_token_ids",
    "capture_and_generate",
    "decode_answers",
    "exact_match",
    "first_token_match",
    "greedy_generate",
    "onednn_linears",
    "position_ids_from_mask",
]


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch, as ``generate`` computes them: 0 at each row's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@cache
def _onednn_linear_works() -> bool:
    """Whether this torch build runs float32 linears through oneDNN, matching ``F.linear`` (checked once)."""
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
    if op is None:
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*shape, generator=gen) for shape in [(3, 5, 64), (48, 64), (48,)])
        with torch.no_grad():
            return torch.allclose(op(x, w, b, "none", [], ""), nn.functional.linear(x, w, b), rtol=1e-4, atol=1e-5)
    except (RuntimeError, NotImplementedError):
        return False


@contextmanager
def onednn_linears(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Run the model's float32 ``nn.Linear`` layers on CPU through oneDNN, for inference (no autograd).

    Same float32 arithmetic, summed in another order (differences ~1e-7 relative); on this project's
    2-core AMD EPYC machine oneDNN's kernels run Gemma 3 270M's projections 1.2-1.5x faster than the
    MKL ``sgemm`` that ``F.linear`` calls (``benchmarks/probe_throughput.py``). Layers that are not plain
    float32 CPU ``nn.Linear`` (quantized, on a GPU, already wrapped by accelerate) are left alone; so is
    everything when gradients are on or this torch build has no oneDNN linear. The original ``forward``
    comes back on exit, even after an exception.

    Yields:
        The number of layers rerouted.

    """
    patched: list[nn.Module] = []
    if enabled and not torch.is_grad_enabled() and _onednn_linear_works():
        op = torch.ops.mkldnn._linear_pointwise
        for m in model.modules():
            if type(m) is nn.Linear and "forward" not in vars(m) and m.weight.device.type == "cpu":
                if m.weight.dtype == torch.float32 and (m.bias is None or m.bias.dtype == torch.float32):
                    m.forward = lambda x, m=m: op(x, m.weight, m.bias, "none", [], "")
                    patched.append(m)
    try:
        yield len(patched)
    finally:
        for m in patched:
            del m.forward


@torch.no_grad()
def capture_and_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layers: int | Sequence[int] | None = None,
    max_new_tokens: int = 0,
    pad_token_id: int | None = None,
    stop_token_ids: torch.Tensor | None = None,
    fast_linear: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual stream at the last prompt token of every row, then greedy continuations.

    Only the last position's logits are computed (``logits_to_keep=1``): with a large vocabulary (Gemma's
    262K) logits over every prompt position would cost about twice the transformer itself.

    Args:
        model: A Hugging Face causal LM.
        input_ids: (B, T) left-padded prompts.
        attention_mask: (B, T).
        layers: 0-based layers to capture; ``None`` for all.
        max_new_tokens: Tokens to generate; 0 captures only (and stops after the deepest layer).
        pad_token_id: Pad id for ``generate``.
        stop_token_ids: (S,) token ids that end an answer (:func:`answer_end_token_ids`): a row that
            generated one is padded from then on, and generation stops once every row has; ``None``
            generates ``max_new_tokens`` tokens.
        fast_linear: Run float32 CPU linears through oneDNN (:func:`onednn_linears`); no effect on a GPU.

    Returns:
        features (L, B, d_model) in sorted layer order (float32, on the model's device), and the
        generated ids (B, n) with n = ``max_new_tokens``, or fewer when every row stopped early.

    """
    with onednn_linears(model, fast_linear):
        return _capture_and_generate(
            model, input_ids, attention_mask, layers, max_new_tokens, pad_token_id, stop_token_ids
        )


def _capture_and_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layers: int | Sequence[int] | None,
    max_new_tokens: int,
    pad_token_id: int | None,
    stop_token_ids: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    positions = last_token_positions(attention_mask)  # (B,) = T - 1 under left padding
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    kwargs["position_ids"] = position_ids_from_mask(attention_mask)
    if max_new_tokens == 0:
        with capture_residual(model, layers, positions, stop_after_last=True) as cap:
            model(**kwargs, use_cache=False)
        return cap.stacked().float(), input_ids.new_zeros(input_ids.shape[0], 0)
    with capture_residual(model, layers, positions) as cap:
        out = model(**kwargs, use_cache=True, logits_to_keep=1)
    first = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1) greedy first answer token
    stop = None
    if stop_token_ids is not None:
        stop = _AnswersEnded(stop_token_ids.to(first.device), start=input_ids.shape[1])
        if bool(stop(torch.cat([input_ids, first], dim=1), None).all()):  # every answer is over already
            return cap.stacked().float(), first
    if max_new_tokens == 1:
        return cap.stacked().float(), first
    ids = torch.cat([input_ids, first], dim=1)
    mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
    # generate only runs the tokens not yet in the cache: here the first answer token onward
    full = model.generate(
        input_ids=ids,
        attention_mask=mask,
        cache=out.cache,
        max_new_tokens=max_new_tokens - 1,
        do_sample=False,
        pad_token_id=pad_token_id,
        stopping_criteria=StoppingCriteriaList([stop]) if stop is not None else None,
    )
    gen = full[:, input_ids.shape[1] :]
    if stop is not None and pad_token_id is not None:  # rows ended by their first token: generate ran one more
        gen[torch.isin(first[:, 0], stop.ids), 1:] = pad_token_id
    return cap.stacked().float(), gen


class _AnswersEnded(StoppingCriteria):
    """Per row: done once a token from position ``start`` on is one of ``ids`` (generate pads finished rows)."""

    def __init__(self, ids: torch.Tensor, start: int) -> None:
        self.ids, self.start = ids, start

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor | None, **kwargs) -> torch.Tensor:
        return torch.isin(input_ids[:, self.start :], self.ids.to(input_ids.device)).any(dim=1)  # (B,) bool


def answer_end_token_ids(tokenizer) -> torch.Tensor:
    """(S,) ids of the vocabulary's tokens whose text contains :data:`~lcd.tasks.text.prompts.ANSWER_END`.

    Decodes every token once (a few seconds for a 262K vocabulary); call it once per run.
    """
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return torch.tensor([i for i, t in enumerate(texts) if ANSWER_END in t], dtype=torch.long)


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    pad_token_id: int | None = None,
    stop_token_ids: torch.Tensor | None = None,
    fast_linear: bool = True,
) -> torch.Tensor:
    """Plain batched greedy continuations (B, n) of left-padded prompts, n <= ``max_new_tokens``.

    ``stop_token_ids``: as in :func:`capture_and_generate`, a row is padded once its answer has ended and
    generation stops when every row's has (``None``: ``max_new_tokens`` tokens). ``fast_linear``: run
    float32 CPU linears through oneDNN (:func:`onednn_linears`).
    """
    stop = None
    if stop_token_ids is not None:
        stop = StoppingCriteriaList([_AnswersEnded(stop_token_ids.to(input_ids.device), start=input_ids.shape[1])])
    with onednn_linears(model, fast_linear):
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_token_id,
            stopping_criteria=stop,
        )
    return out[:, input_ids.shape[1] :]


def decode_answers(tokenizer, generated: torch.Tensor) -> list[str]:
    """The model's answers: generated text up to the first :data:`~lcd.tasks.text.prompts.ANSWER_END`, stripped."""
    texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
    return [t.split(ANSWER_END, 1)[0].strip() for t in texts]


def exact_match(predictions: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
    """(B,) bool: prediction equals the gold answer exactly (both stripped)."""
    return torch.tensor([p.strip() == a.strip() for p, a in zip(predictions, answers, strict=True)])


def answer_budget(tokenizer, answers: Sequence[str], prefix: str = " ") -> int:
    """Tokens to generate: the longest tokenized answer plus one, so an over-long answer is caught."""
    ids = tokenizer([prefix + a for a in answers], add_special_tokens=False)["input_ids"]
    return max(len(i) for i in ids) + 1


def first_token_match(generated: torch.Tensor, first_answer_id: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the first generated token is the gold answer's first token.

    That token is the one the last prompt token predicts directly (for bitwise arithmetic, the first
    digit), so this is where an intervention at the last prompt token acts first. ``first_answer_id``
    comes with every batch of :func:`lcd.data.text.encode_prompts`. For one-token answers it agrees
    with exact match whenever the model also ends the answer after that token.

    Args:
        generated: (B, n) greedy continuations, n >= 1.
        first_answer_id: (B,) gold first answer tokens.

    """
    return generated[:, 0] == first_answer_id.to(generated.device)
