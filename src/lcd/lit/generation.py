"""Batched probing of a causal LM on left-padded ICL prompts: capture, greedy answers, exact match.

One forward pass over the prompt does both jobs: hooks from :mod:`lcd.activations` keep every
requested layer's residual stream at the last prompt token (the token before the answer), and the
same pass fills the KV cache from which ``model.generate`` continues greedily. The position ids of
that pass are the ones ``generate`` derives from the attention mask, so a left-padded row sees exactly
what it would see alone (tested against unpadded single-prompt runs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lcd.activations import capture_residual, last_token_positions
from lcd.tasks.text.prompts import ANSWER_END

__all__ = [
    "answer_budget",
    "capture_and_generate",
    "decode_answers",
    "exact_match",
    "first_token_match",
    "greedy_generate",
    "position_ids_from_mask",
]


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch, as ``generate`` computes them: 0 at each row's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def capture_and_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layers: int | Sequence[int] | None = None,
    max_new_tokens: int = 0,
    pad_token_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual stream at the last prompt token of every row, then greedy continuations.

    Args:
        model: A Hugging Face causal LM.
        input_ids: (B, T) left-padded prompts.
        attention_mask: (B, T).
        layers: 0-based layers to capture; ``None`` for all.
        max_new_tokens: Tokens to generate; 0 captures only (and stops after the deepest layer).
        pad_token_id: Pad id for ``generate``.

    Returns:
        features (L, B, d_model) in sorted layer order (float32, on the model's device), and the
        generated ids (B, max_new_tokens).

    """
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
    )
    return cap.stacked().float(), full[:, input_ids.shape[1] :]


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    pad_token_id: int | None = None,
) -> torch.Tensor:
    """Plain batched greedy continuations (B, max_new_tokens) of left-padded prompts."""
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_token_id,
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
