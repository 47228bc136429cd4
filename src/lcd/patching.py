"""Mean-activation patching (PAPER.md §2 and §4), built on :func:`lcd.activations.patch_residual`.

At one layer and the query position (the token before the answer; for the synthetic model the last x
token), the residual stream is patched with the mean activation of a concept, measured on prompts
separate from the evaluated ones:

- positive: the mean of the prompt's own concept; negative: the mean of Null (LLMs) or of another
  basis (synthetic model).
- ``mode="replace"`` (default) sets the activation to the mean. It keeps the patched state on the
  distribution of real activations at that layer (norm and shared components included) and is the
  task-vector protocol (Hendel et al., 2023) that the paper's v3 builds on; the query's own
  information is still reachable by later layers through attention to earlier tokens.
- ``mode="add"`` adds the concept's *offset*, ``mean_concept - mean_all`` (``mean_all``: the mean of the
  class means), a steering-vector style intervention. Adding the raw mean instead would also double
  the component shared by every activation, which perturbs the model even for the right concept.

The paper does not say which it used (PAPER.md "Known gaps"); both are one option away.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from lcd.activations import capture_residual, patch_residual
from lcd.layers import select_layers

PatchMode = Literal["replace", "add"]

__all__ = [
    "PatchMode",
    "LLMPatching",
    "SyntheticPatching",
    "class_means",
    "llm_patching",
    "patch_value",
    "patched",
    "synthetic_patching_matrix",
]


def class_means(features: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Mean feature of each class: (N, d), (N,) -> (C, d).

    Raises:
        ValueError: if a class has no point.

    """
    counts = torch.bincount(labels, minlength=n_classes)
    if (counts == 0).any():
        missing = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(f"classes {missing} have no activations to average: add prompts for them.")
    sums = torch.zeros(n_classes, features.shape[-1], dtype=torch.float32, device=features.device)
    sums.index_add_(0, labels.to(features.device), features.float())
    return sums / counts.to(sums.device)[:, None]


def patch_value(means: torch.Tensor, source: torch.Tensor, mode: PatchMode = "replace") -> torch.Tensor:
    """What to write at the query position for each row: (C, d), (B,) source classes -> (B, d).

    ``replace``: the source class mean. ``add``: the source mean minus the mean of all class means.
    """
    value = means[source.to(means.device)]
    return value if mode == "replace" else value - means.mean(0)


def patched(model: nn.Module, layer: int, positions: torch.Tensor, value: torch.Tensor, mode: PatchMode = "replace"):
    """Context manager: every forward inside is patched at ``layer``/``positions`` (see module docstring)."""
    return patch_residual(model, layer, positions, value, mode)


# --- synthetic model: source basis x target basis matrix of MSE change ------------------------------


@dataclass
class SyntheticPatching:
    """Result of :func:`synthetic_patching_matrix`.

    Attributes:
        delta: (K, K) entry (s, t) = query MSE of basis-t prompts patched with basis s's mean minus
            their unpatched query MSE. Positive: patching hurt.
        base: (K,) unpatched query MSE per target basis.
        layer: The patched layer (0-based).
        cd: (L,) CD per layer at the query token on the mean-estimation prompts (picks the default layer).

    """

    delta: torch.Tensor
    base: torch.Tensor
    layer: int
    cd: torch.Tensor


@torch.no_grad()
def synthetic_patching_matrix(
    model: nn.Module,
    mean_batches: Iterable[dict[str, torch.Tensor]],
    eval_batches: Iterable[dict[str, torch.Tensor]],
    n_concepts: int,
    layer: int | None = None,
    mode: PatchMode = "replace",
    forward: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor] | None = None,
) -> SyntheticPatching:
    """Patch the synthetic model's query x token with each basis's mean; MSE change per target basis.

    Args:
        model: The :class:`~lcd.models.icl_gpt.ICLTransformer` (or a LitPretrain wrapping it).
        mean_batches: Batches (``xs``, ``ys``, ``concept``) for the class means, e.g. the probe set.
        eval_batches: Different batches to patch and score, e.g. the validation set.
        n_concepts: Number of bases K.
        layer: Layer to patch (0-based); ``None`` picks the layer of best CD on ``mean_batches``.
        mode: ``replace`` or ``add`` (see the module docstring).
        forward: ``forward(model, batch) -> (B, n)`` predictions; default ``model(xs, ys)``.

    Returns:
        A :class:`SyntheticPatching`; the query is the last x token, whose prediction is ``y_{n-1}``.

    """
    from lcd.activations import n_decoder_layers
    from lcd.decodability import concept_decodability

    forward = forward or (lambda m, b: m(b["xs"], b["ys"]))
    n_layers = n_decoder_layers(model)
    if layer is not None:
        (layer,) = select_layers(layer, n_layers)
    feats, labels = [], []
    for batch in mean_batches:
        query = torch.full((batch["xs"].shape[0],), 2 * batch["xs"].shape[1] - 2)  # last x token
        with capture_residual(model, None, query) as cap:
            forward(model, batch)
        feats.append(cap.stacked().float())
        labels.append(batch["concept"])
    features, concept = torch.cat(feats, 1), torch.cat(labels)  # (L, N, d), (N,)
    cd = concept_decodability(features, concept)
    layer = int(cd.argmax()) if layer is None else layer
    means = class_means(features[layer], concept, n_concepts)  # (K, d)
    base_sum, base_n = torch.zeros(n_concepts), torch.zeros(n_concepts)
    patched_sum = torch.zeros(n_concepts, n_concepts)
    for batch in eval_batches:
        b, n = batch["xs"].shape[:2]
        query, target = torch.full((b,), 2 * n - 2), batch["concept"].cpu()
        err = (forward(model, batch)[:, -1] - batch["ys"][:, -1]).pow(2).cpu()  # (B,) query MSE
        base_sum.index_add_(0, target, err)
        base_n.index_add_(0, target, torch.ones(b))
        for s in range(n_concepts):
            value = patch_value(means, torch.full((b,), s), mode)
            with patch_residual(model, layer, query, value, mode):
                err_s = (forward(model, batch)[:, -1] - batch["ys"][:, -1]).pow(2).cpu()
            patched_sum[s].index_add_(0, target, err_s)
    base = base_sum / base_n.clamp(min=1)
    return SyntheticPatching(patched_sum / base_n.clamp(min=1) - base, base, layer, cd)


# --- pretrained LMs: accuracy change per concept -----------------------------------------------------


@dataclass
class LLMPatching:
    """Result of :func:`llm_patching`: exact-match accuracy per concept (Null excluded), each (C,).

    Attributes:
        base: Unpatched accuracy.
        positive: Accuracy with the prompt's own concept mean patched in.
        negative: Accuracy with the Null mean patched in.
        layer: The patched layer (0-based).
        n: Prompts per concept.

    """

    base: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor
    layer: int
    n: torch.Tensor


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def llm_patching(
    model: nn.Module,
    tokenizer,
    mean_batches: Iterable[dict],
    eval_batches: Iterable[dict],
    layer: int,
    null_id: int,
    mode: PatchMode = "replace",
    base: torch.Tensor | None = None,
) -> LLMPatching:
    """Positive and negative mean-activation patching of an LM at the last prompt token.

    Args:
        model: A Hugging Face causal LM.
        tokenizer: Its tokenizer (to decode answers).
        mean_batches: Prompt batches (see :mod:`lcd.data.text`) for the class means, from the train split,
            every class including Null present.
        eval_batches: Prompt batches to patch and score (their Null rows are skipped).
        layer: Layer to patch (0-based, negative from the end).
        null_id: Concept id of Null (= number of concepts).
        mode: ``replace`` or ``add`` (see the module docstring).
        base: Unpatched accuracy per concept (C,) if already known (skips one generation pass).

    """
    from lcd.activations import last_token_positions, n_decoder_layers
    from lcd.lit.generation import answer_budget, capture_and_generate, decode_answers, exact_match, greedy_generate

    (layer,) = select_layers(layer, n_decoder_layers(model))
    device = next(model.parameters()).device
    feats, labels = [], []
    for batch in mean_batches:
        batch = _to(batch, device)
        f, _ = capture_and_generate(model, batch["input_ids"], batch["attention_mask"], [layer])
        feats.append(f[0].cpu())
        labels.append(batch["concept"].cpu())
    means = class_means(torch.cat(feats), torch.cat(labels), null_id + 1)  # (C + 1, d)
    hits = torch.zeros(3, null_id)  # base, positive, negative
    n = torch.zeros(null_id)
    for batch in eval_batches:
        keep = batch["concept"] != null_id
        if not keep.any():
            continue
        batch = _to({k: v[keep] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}, device)
        answers = [a for a, k in zip(batch["answers"], keep.tolist(), strict=True) if k]
        ids, mask, concept = batch["input_ids"], batch["attention_mask"], batch["concept"]
        budget = answer_budget(tokenizer, answers)
        positions = last_token_positions(mask)
        sources = {"positive": concept, "negative": torch.full_like(concept, null_id)}
        for row, name in enumerate(["base", "positive", "negative"]):
            if name == "base" and base is not None:
                continue
            if name == "base":
                out = greedy_generate(model, ids, mask, budget, tokenizer.pad_token_id)
            else:
                value = patch_value(means, sources[name], mode)
                with patch_residual(model, layer, positions, value, mode):
                    out = greedy_generate(model, ids, mask, budget, tokenizer.pad_token_id)
            correct = exact_match(decode_answers(tokenizer, out), answers).float()
            hits[row].index_add_(0, concept.cpu(), correct)
        n.index_add_(0, concept.cpu(), torch.ones(len(answers)))
    acc = hits / n.clamp(min=1)
    return LLMPatching(acc[0] if base is None else base.float().cpu(), acc[1], acc[2], layer, n)
