"""The one place lcd touches a model's internals: residual-stream capture and patching hooks.

Vocabulary: ``layer`` is a 0-based decoder block index; the activation of layer ``i`` is the block's
output residual stream. transformers' ``hidden_states`` has the embeddings at index 0, so block ``i``
is ``hidden_states[i + 1]``; its last entry has the final norm applied, while the capture here returns
the raw block output for every layer, the last one included. Positions are per-row token indices, so
left- or right-padded batches each get the right token.

Every hook is registered inside a context manager and removed in ``finally``, even when the forward
raises.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from lcd.layers import select_layers

__all__ = [
    "POSITIONS",
    "Capture",
    "Position",
    "capture_residual",
    "find_decoder_layers",
    "last_token_positions",
    "n_decoder_layers",
    "patch_residual",
]


Position = Literal["query", "last_y", "last"]
"""Where a probe reads the residual stream, one vocabulary for every module:

- ``query``: the token right before the answer (the paper's choice): the last prompt token of a text
  prompt, the query x token of a synthetic prompt;
- ``last_y``: synthetic prompts only, the y token just before the query x (where the context is summarised);
- ``last``: the last token of the sequence (text prompt+answer batches: the answer's last token).
"""
POSITIONS: tuple[str, ...] = ("query", "last_y", "last")


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """Return the ModuleList of decoder blocks of any transformer, peft-wrapped or not.

    Found generically: the longest ``nn.ModuleList`` whose children all share one class (the repeated
    block), never by architecture name. Works for GPT-2 (``h``), Llama/Gemma (``layers``) and peft
    wrappers around them.

    Raises:
        ValueError: if the model has no such list.

    """
    best: nn.ModuleList | None = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(child) for child in module}) == 1 and (best is None or len(module) > len(best)):
                best = module
    if best is None:
        raise ValueError(f"{type(model).__name__} has no ModuleList of repeated blocks: is it a transformer?")
    return best


def n_decoder_layers(model: nn.Module) -> int:
    """Number of decoder blocks of ``model``."""
    return len(find_decoder_layers(model))


def last_token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of every row, for left- or right-padded batches: (B, T) -> (B,)."""
    t = attention_mask.shape[1]
    idx = torch.arange(t, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), idx, -1).amax(dim=1)


def _hidden(output: torch.Tensor | tuple) -> torch.Tensor:
    # Blocks return a tensor (transformers >= 5) or a tuple whose first item is the hidden state.
    return output if isinstance(output, torch.Tensor) else output[0]


def _gather(hidden: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    # hidden (B, T, d); positions (B,) or (B, P) -> (B, d) or (B, P, d)
    if positions is None:
        return hidden
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    pos = positions.to(hidden.device)
    return hidden[rows, pos] if pos.dim() == 1 else hidden[rows[:, None], pos]


class _StopForward(Exception):
    """Raised by the last needed hook to skip the rest of the forward pass."""


class Capture:
    """Activations collected by :func:`capture_residual`: ``capture[layer]`` is the captured tensor."""

    def __init__(self) -> None:
        self.activations: dict[int, torch.Tensor] = {}
        self.stopped_early = False

    def __getitem__(self, layer: int) -> torch.Tensor:
        return self.activations[layer]

    def stacked(self) -> torch.Tensor:
        """All captured layers stacked in layer order: (L, B, ...)."""
        return torch.stack([self.activations[k] for k in sorted(self.activations)])


@contextmanager
def capture_residual(
    model: nn.Module,
    layers: int | Sequence[int] | None = None,
    positions: torch.Tensor | None = None,
    stop_after_last: bool = False,
    detach: bool = True,
) -> Iterator[Capture]:
    """Capture the residual stream after chosen decoder blocks, at chosen token positions only.

    Example::

        with capture_residual(model, layers=[3, -1], positions=last_token_positions(mask)) as cap:
            model(input_ids=ids, attention_mask=mask)
        h = cap[3]  # (B, d_model)

    Args:
        model: Any module containing decoder blocks (see :func:`find_decoder_layers`).
        layers: 0-based block indices (negative from the end); ``None`` for all.
        positions: (B,) or (B, P) token indices kept per row; ``None`` keeps every position.
        stop_after_last: Abort the forward right after the deepest requested block (saves compute);
            the exception is swallowed by this context manager, so no model output exists then.
        detach: Detach captured tensors from the graph.

    Yields:
        A :class:`Capture` filled in during the forward pass.

    """
    blocks = find_decoder_layers(model)
    wanted = select_layers(layers, len(blocks))
    cap = Capture()
    last = max(wanted)

    def make_hook(layer: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor | tuple) -> None:
            h = _gather(_hidden(output), positions)
            cap.activations[layer] = h.detach() if detach else h
            if stop_after_last and layer == last:
                cap.stopped_early = True
                raise _StopForward

        return hook

    handles = [blocks[i].register_forward_hook(make_hook(i)) for i in wanted]
    try:
        yield cap
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def patch_residual(
    model: nn.Module,
    layer: int,
    positions: torch.Tensor,
    value: torch.Tensor,
    mode: Literal["replace", "add"] = "replace",
    onward: bool = False,
) -> Iterator[None]:
    """Overwrite (or add to) the residual stream after one block at one position per row (or from it on).

    Under greedy generation with a KV cache the prompt is one forward and every new token one more
    forward of a single token. A forward no longer than ``positions.max()`` cannot contain the patched
    position, so it is taken as such an incremental step: left alone by default (the patched position's
    keys and values, computed in the prompt forward, still reach every later token through attention),
    patched at every token with ``onward=True``.

    Args:
        model: Any module containing decoder blocks.
        layer: 0-based block index (negative from the end).
        positions: (B,) token index to patch in each row.
        value: (d_model,) or (B, d_model) activation to write there.
        mode: ``replace`` sets the activation to ``value``; ``add`` adds ``value`` to it.
        onward: Also patch every later token of each row: later positions of the same forward and every
            token of later incremental (KV-cache) forwards, i.e. each token generated after the prompt.

    """
    blocks = find_decoder_layers(model)
    (layer,) = select_layers(layer, len(blocks))

    def hook(module: nn.Module, args: tuple, output: torch.Tensor | tuple) -> torch.Tensor | tuple:
        h = _hidden(output)  # (B, T, d)
        pos = positions.to(h.device)
        if h.shape[1] <= int(pos.max()):  # incremental decoding step: the patched token is not here
            if not onward:
                return output
            where = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)  # every new token comes later
        else:
            idx = torch.arange(h.shape[1], device=h.device)[None, :]  # (1, T)
            where = idx >= pos[:, None] if onward else idx == pos[:, None]  # (B, T)
        v = value.to(h.device, h.dtype).expand(h.shape[0], h.shape[-1])[:, None, :]  # (B, 1, d)
        m = where[..., None]  # (B, T, 1)
        h = torch.where(m, v, h) if mode == "replace" else h + m * v
        return h if isinstance(output, torch.Tensor) else (h, *output[1:])

    handle = blocks[layer].register_forward_hook(hook, prepend=True)  # before any capture hook: it sees the patch
    try:
        yield
    finally:
        handle.remove()
