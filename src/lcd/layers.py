"""Which decoder blocks: the one layer-selection vocabulary of lcd.

Every option that chooses layers (the CD callback's ``layers``, the LLM probe's ``layers``, a finetuning
method's ``layers``) takes the same values, resolved late, against the loaded model's depth, so one YAML
fits any model:

- ``null``: every layer;
- a list of 0-based indices, negative ones counting from the end (``[0, 4, -1]``), or one index;
- a strategy chosen by ``class_path``::

      layers:
        class_path: lcd.layers.EarlyLayers
        init_args: {fraction: 0.333}   # first third of whatever model is loaded

:func:`select_layers` turns any of them into sorted 0-based indices without duplicates. An empty or
out-of-range selection raises ``ValueError`` naming the valid range, before any work.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

__all__ = [
    "AllLayers",
    "EarlyLayers",
    "LateLayers",
    "LayerGroup",
    "LayerList",
    "LayerRange",
    "LayerSpec",
    "layer_group",
    "select_layers",
]


class LayerGroup(ABC):
    """A set of decoder blocks, known only once the model's depth ``n_layers`` is."""

    def resolve(self, n_layers: int) -> list[int]:
        """Sorted 0-based block indices of this group for a model with ``n_layers`` blocks.

        Raises:
            ValueError: if the selection is empty or names a block the model does not have.

        """
        if n_layers < 1:
            raise ValueError(f"a model with n_layers={n_layers} has no decoder blocks to select from.")
        layers = sorted(set(self._select(n_layers)))
        if not layers:
            raise ValueError(f"{self!r} selects no layer of a model with {n_layers} layers.")
        bad = [i for i in layers if not 0 <= i < n_layers]
        if bad:
            raise ValueError(
                f"{self!r} selects layer(s) {bad}, out of range for a model with {n_layers} layers "
                f"(valid: 0..{n_layers - 1}, 0-based)."
            )
        return layers

    @abstractmethod
    def _select(self, n_layers: int) -> list[int]:
        """Candidate indices (checked by :meth:`resolve`)."""

    def describe(self, n_layers: int) -> str:
        """Short human-readable label, e.g. ``layers 0-5 of 18``."""
        layers = self.resolve(n_layers)
        contiguous = layers == list(range(layers[0], layers[-1] + 1))
        span = f"{layers[0]}-{layers[-1]}" if contiguous and len(layers) > 1 else ",".join(map(str, layers))
        return f"layers {span} of {n_layers}"

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if v is not None)
        return f"{type(self).__name__}({args})"


def _count_from(count: int | None, fraction: float | None, n_layers: int, name: str) -> int:
    """Number of blocks from exactly one of ``count`` / ``fraction`` (rounded to nearest, at least 1)."""
    _check_args(count, fraction, name)
    if count is not None:
        if count > n_layers:
            raise ValueError(f"{name}: count={count} exceeds the model's {n_layers} layers.")
        return count
    # Round half up (Python's round() is banker's rounding); never fewer than one block.
    return max(1, min(n_layers, math.floor(fraction * n_layers + 0.5)))


def _check_args(count: int | None, fraction: float | None, name: str) -> None:
    # Validate what can be validated without n_layers, so a bad YAML fails at parse time.
    if (count is None) == (fraction is None):
        raise ValueError(f"{name}: give exactly one of count or fraction (got count={count}, fraction={fraction}).")
    if count is not None and count < 1:
        raise ValueError(f"{name}: count must be >= 1, got {count}.")
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise ValueError(f"{name}: fraction must be in (0, 1], got {fraction}.")


class EarlyLayers(LayerGroup):
    """The first blocks of the model: ``count`` of them, or ``fraction`` of its depth.

    Args:
        count: Number of blocks from the bottom (layer 0 upwards).
        fraction: Share of the depth, rounded to the nearest block (at least one), e.g. 0.333 of 18 -> 6.

    """

    def __init__(self, count: int | None = None, fraction: float | None = None) -> None:
        _check_args(count, fraction, "EarlyLayers")
        self.count, self.fraction = count, fraction

    def _select(self, n_layers: int) -> list[int]:
        return list(range(_count_from(self.count, self.fraction, n_layers, "EarlyLayers")))


class LateLayers(LayerGroup):
    """The last blocks of the model: ``count`` of them, or ``fraction`` of its depth.

    Args:
        count: Number of blocks from the top (the last layer downwards).
        fraction: Share of the depth, rounded to the nearest block (at least one).

    """

    def __init__(self, count: int | None = None, fraction: float | None = None) -> None:
        _check_args(count, fraction, "LateLayers")
        self.count, self.fraction = count, fraction

    def _select(self, n_layers: int) -> list[int]:
        n = _count_from(self.count, self.fraction, n_layers, "LateLayers")
        return list(range(n_layers - n, n_layers))


class LayerRange(LayerGroup):
    """Blocks ``start <= layer < stop`` (Python ``range`` semantics; negative values count from the end).

    Args:
        start: First block (0-based; negative counts from the end).
        stop: One past the last block; ``None`` for the end of the model.

    """

    def __init__(self, start: int = 0, stop: int | None = None) -> None:
        self.start, self.stop = start, stop

    def _select(self, n_layers: int) -> list[int]:
        for name, value in (("start", self.start), ("stop", self.stop)):
            if value is not None and not -n_layers <= value <= n_layers:
                raise ValueError(
                    f"{self!r}: {name}={value} is out of range for a model with {n_layers} layers "
                    f"(valid: -{n_layers}..{n_layers})."
                )
        return list(range(n_layers)[self.start : self.stop])


class LayerList(LayerGroup):
    """An explicit list of blocks (0-based; negative indices count from the end).

    Args:
        layers: Block indices, e.g. ``[0, 4, -1]``.

    """

    def __init__(self, layers: Sequence[int]) -> None:
        self.layers = list(layers)

    def _select(self, n_layers: int) -> list[int]:
        for layer in self.layers:
            if not -n_layers <= layer < n_layers:
                raise ValueError(
                    f"layer {layer} is out of range for a model with {n_layers} layers: "
                    f"use 0..{n_layers - 1} (0-based) or -{n_layers}..-1."
                )
        return [i % n_layers for i in self.layers]


class AllLayers(LayerGroup):
    """Every decoder block."""

    def _select(self, n_layers: int) -> list[int]:
        return list(range(n_layers))


LayerSpec = LayerGroup | int | Sequence[int] | None
"""What every ``layers`` option accepts: a strategy, one index, a list of indices, or ``None`` for all."""


def layer_group(layers: LayerSpec) -> LayerGroup:
    """The :class:`LayerGroup` of any ``layers`` value: ``None`` -> all, indices -> :class:`LayerList`."""
    if isinstance(layers, LayerGroup):
        return layers
    if layers is None:
        return AllLayers()
    return LayerList([layers] if isinstance(layers, int) else layers)


def select_layers(layers: LayerSpec, n_layers: int) -> list[int]:
    """Sorted 0-based block indices of ``layers`` (see the module docstring) for a model of ``n_layers`` blocks.

    Raises:
        ValueError: for an index outside ``[-n_layers, n_layers)`` or an empty selection, naming the valid range.

    """
    return layer_group(layers).resolve(n_layers)
