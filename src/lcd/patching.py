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

For LMs the answers are generated greedily and scored two ways (:class:`LLMPatching`): exact match of
the whole answer, and first-token accuracy, the token the patched query position predicts itself.
The query patch reaches the later answer tokens only through attention to the query's keys and values
at the layers after the patched one (the tokens' own residuals are not patched), so on a five-digit
bitwise answer it moves exact match far less than the first digit; ``positions="answer"`` also patches
every generated token (:data:`PatchPosition`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from lcd.activations import capture_residual, patch_residual
from lcd.layers import select_layers

PatchMode = Literal["replace", "add"]

__all__ = [
    "PATCH_POSITIONS",
    "PatchMode",
    "PatchPosition",
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


def patched(
    model: nn.Module,
    layer: int,
    positions: torch.Tensor,
    value: torch.Tensor,
    mode: PatchMode = "replace",
    onward: bool = False,
):
    """Context manager: every forward inside is patched at ``layer``/``positions`` (see module docstring).

    ``onward=True`` also patches every later token, generated ones included (see
    :func:`lcd.activations.patch_residual`): the ``answer`` position of :data:`PatchPosition`.
    """
    return patch_residual(model, layer, positions, value, mode, onward)


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
    """One entry of :func:`llm_patching` (one layer, one position): accuracy per concept, each (C,), Null excluded.

    Two scores of the same greedy answers: exact match of the whole answer, and first-token accuracy
    (the first generated token is the gold answer's first token, the one the patched query position
    predicts directly; for bitwise arithmetic, the first digit).

    Attributes:
        base: Unpatched exact match.
        positive: Exact match with the prompt's own concept mean patched in.
        negative: Exact match with the Null mean patched in.
        base_first_token: Unpatched first-token accuracy.
        positive_first_token: First-token accuracy, positive patching.
        negative_first_token: First-token accuracy, negative patching.
        layer: The patched layer (0-based).
        position: Where it was patched (:data:`PatchPosition`).
        n: Prompts per concept.

    """

    base: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor
    base_first_token: torch.Tensor
    positive_first_token: torch.Tensor
    negative_first_token: torch.Tensor
    layer: int
    position: str
    n: torch.Tensor

    def accuracy(self, metric: Literal["exact", "first_token"], sign: Literal["base", "positive", "negative"]):
        """The (C,) accuracy of one metric and sign, e.g. ``accuracy("first_token", "negative")``."""
        return getattr(self, sign if metric == "exact" else f"{sign}_first_token")


PatchPosition = Literal["query", "answer"]
"""Where LLM patching writes the mean at its layer:

- ``query``: the last prompt token only (the paper's choice): it predicts the first answer token; the
  rest of the answer feels the patch only through attention to that token's keys and values;
- ``answer``: the query and every generated answer token, i.e. every position that predicts an answer
  token (each greedy decoding step is patched too).
"""
PATCH_POSITIONS: tuple[str, ...] = ("query", "answer")


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _rows(batch: dict, keep: torch.Tensor) -> dict:
    """The rows of a batch where ``keep`` (B,) is true (tensors and lists alike)."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v[keep]
        elif isinstance(v, list):
            v = [x for x, r in zip(v, keep.tolist(), strict=True) if r]
        out[k] = v
    return out


def _score(tokenizer, generated: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
    """(B,) float hits of both metrics of :class:`LLMPatching` for greedy answers (B, n)."""
    from lcd.lit.generation import decode_answers, exact_match, first_token_match

    return {
        "exact": exact_match(decode_answers(tokenizer, generated), batch["answers"]).float(),
        "first_token": first_token_match(generated, batch["first_answer_id"]).float().cpu(),
    }


@torch.no_grad()
def llm_patching(
    model: nn.Module,
    tokenizer,
    mean_batches: Iterable[dict],
    eval_batches: Iterable[dict],
    layers: int | Sequence[int],
    null_id: int,
    mode: PatchMode = "replace",
    positions: PatchPosition | Sequence[PatchPosition] = "query",
    means: dict[int, torch.Tensor] | None = None,
    base: dict[str, torch.Tensor] | None = None,
    on_batch: Callable[[dict, int], None] | None = None,
    stop_token_ids: torch.Tensor | None = None,
) -> list[LLMPatching]:
    """Positive and negative mean-activation patching of an LM, at each layer and position asked for.

    The class means are measured at the last prompt token of ``mean_batches`` (every layer asked for, in
    one pass). Each evaluation batch is answered greedily once unpatched, then once per position, layer
    and sign under :func:`lcd.activations.patch_residual`, and both exact match and first-token
    accuracy are scored (see :class:`LLMPatching`).

    Args:
        model: A Hugging Face causal LM.
        tokenizer: Its tokenizer (to decode answers).
        mean_batches: Prompt batches (see :mod:`lcd.data.text`) for the class means, from the train split,
            every class including Null present.
        eval_batches: Prompt batches to patch and score (their Null rows are skipped); they carry
            ``first_answer_id`` (:func:`lcd.data.text.encode_prompts` adds it).
        layers: Layer or layers to patch (0-based, negative from the end).
        null_id: Concept id of Null (= number of concepts).
        mode: ``replace`` or ``add`` (see the module docstring).
        positions: ``query`` or ``answer`` (see :data:`PatchPosition`), or several.
        means: The class means (C + 1, d) of every patched layer if already known; ``mean_batches`` is then
            not read.
        base: The unpatched accuracy per concept (C,) of both metrics (``exact``, ``first_token``) if already
            known, e.g. from the probe's own answers to ``eval_batches``; the unpatched pass is then skipped.
        on_batch: Called after each batch with the batch (its Null rows dropped) and the forward passes run
            over it, e.g. to report progress.
        stop_token_ids: Ids of the tokens that end an answer (:func:`lcd.lit.generation.answer_end_token_ids`):
            each generation stops once every row's answer has ended (the scores do not change); ``None``
            generates the whole answer budget.

    Returns:
        One :class:`LLMPatching` per position (outer, in the order given) and layer (sorted); the
        unpatched ``base`` is measured once and shared.

    Raises:
        ValueError: an unknown position, or a layer out of range.

    """
    from lcd.activations import last_token_positions, n_decoder_layers
    from lcd.lit.generation import answer_budget, capture_and_generate, greedy_generate

    positions = [positions] if isinstance(positions, str) else list(positions)
    if not positions or any(p not in PATCH_POSITIONS for p in positions):
        raise ValueError(f"patch positions must be among {list(PATCH_POSITIONS)}, got {positions}.")
    layers = select_layers([layers] if isinstance(layers, int) else list(layers), n_decoder_layers(model))  # sorted
    device = next(model.parameters()).device
    if means is None:
        feats, labels = [], []
        for batch in mean_batches:
            batch = _to(batch, device)
            f, _ = capture_and_generate(model, batch["input_ids"], batch["attention_mask"], layers)
            feats.append(f.cpu())  # (L, B, d)
            labels.append(batch["concept"].cpu())
            if on_batch is not None:
                on_batch(batch, 1)
        features, concept = torch.cat(feats, 1), torch.cat(labels)  # (L, N, d), (N,)
        means = {layer: class_means(features[i], concept, null_id + 1) for i, layer in enumerate(layers)}  # (C+1, d)
    runs = [(p, layer) for p in positions for layer in layers]
    # hits[metric][run, sign, concept]; sign 0 base (same for every run), 1 positive, 2 negative
    hits = {m: torch.zeros(len(runs), 3, null_id) for m in ("exact", "first_token")}
    n = torch.zeros(null_id)
    pad = tokenizer.pad_token_id
    for batch in eval_batches:
        keep = batch["concept"] != null_id
        if not keep.any():
            continue
        batch = _to(_rows(batch, keep), device)
        ids, mask, concept = batch["input_ids"], batch["attention_mask"], batch["concept"]
        budget = answer_budget(tokenizer, batch["answers"])
        query = last_token_positions(mask)
        if base is None:
            unpatched = _score(tokenizer, greedy_generate(model, ids, mask, budget, pad, stop_token_ids), batch)
            for m in hits:
                hits[m][:, 0].index_add_(1, concept.cpu(), unpatched[m].expand(len(runs), -1))
        sources = {1: concept, 2: torch.full_like(concept, null_id)}  # positive: own concept; negative: Null
        for r, (position, layer) in enumerate(runs):
            for sign, source in sources.items():
                value = patch_value(means[layer], source, mode)
                with patch_residual(model, layer, query, value, mode, onward=position == "answer"):
                    got = _score(tokenizer, greedy_generate(model, ids, mask, budget, pad, stop_token_ids), batch)
                for m in hits:
                    hits[m][r, sign].index_add_(0, concept.cpu(), got[m])
        n.index_add_(0, concept.cpu(), torch.ones(len(concept)))
        if on_batch is not None:
            on_batch(batch, 2 * len(runs) + (base is None))
    acc = {m: h / n.clamp(min=1) for m, h in hits.items()}
    if base is not None:
        for m in acc:
            acc[m][:, 0] = base[m]
    return [
        LLMPatching(
            *acc["exact"][r],
            *acc["first_token"][r],
            layer=layer,
            position=position,
            n=n,
        )
        for r, (position, layer) in enumerate(runs)
    ]
