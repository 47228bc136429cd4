"""Finetuning methods restricted to a layer group, swapped by ``class_path``.

A method decides which parameters of a model train; a :class:`~lcd.layers.LayerGroup` decides which
decoder blocks it may touch. Both are resolved against the model once it is loaded::

    method:
      class_path: lcd.finetuning.LoRA
      init_args:
        layers: {class_path: lcd.layers.EarlyLayers, init_args: {fraction: 0.333}}

Methods work on any module whose decoder blocks :func:`lcd.activations.find_decoder_layers` finds: HF
causal LMs (Llama, Gemma 2/3, GPT-2, ...) and lcd's synthetic :class:`~lcd.models.ICLTransformer`.
Nothing here branches on architecture names: LoRA's ``layers_pattern`` is the path of the block
ModuleList and its default targets are the linear modules found inside the selected blocks.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Literal

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from lcd.activations import find_decoder_layers
from lcd.layers import AllLayers, LayerGroup, layer_group

__all__ = [
    "FinetuneMethod",
    "FullFinetune",
    "LayerFinetune",
    "LoRA",
    "count_parameters",
    "decoder_layers_path",
    "default_target_modules",
    "lora_targets",
    "trainable_parameter_names",
]

_LINEAR_TYPES = (nn.Linear, Conv1D)  # what peft's LoRA wraps here; GPT-2's Conv1D needs fan_in_fan_out
_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)\.")


def decoder_layers_path(model: nn.Module) -> str:
    """Dotted path of the decoder-block ModuleList inside ``model``, e.g. ``model.layers`` or ``backbone.h``."""
    blocks = find_decoder_layers(model)
    for name, module in model.named_modules():
        if module is blocks:
            return name
    raise ValueError(f"the decoder blocks of {type(model).__name__} are not a named submodule.")  # pragma: no cover


def default_target_modules(model: nn.Module, layers: list[int]) -> list[str]:
    """Paths, relative to a block, of every linear module inside the selected blocks.

    E.g. ``['mlp.down_proj', ..., 'self_attn.v_proj']`` for Llama/Gemma, ``['attn.c_attn', 'attn.c_proj',
    'mlp.c_fc', 'mlp.c_proj']`` for GPT-2.
    """
    blocks = find_decoder_layers(model)
    names = {name for i in layers for name, m in blocks[i].named_modules() if name and isinstance(m, _LINEAR_TYPES)}
    if not names:
        raise ValueError(f"no nn.Linear or Conv1D module inside decoder blocks {layers}: give target_modules.")
    return sorted(names)


def lora_targets(model: nn.Module) -> set[str]:
    """Names of the modules carrying a LoRA adapter, relative to the unwrapped base model."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return {name for name, m in base.named_modules() if isinstance(m, LoraLayer)}


def trainable_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters with ``requires_grad``."""
    return {name for name, p in model.named_parameters() if p.requires_grad}


def _matches(name: str, targets: list[str]) -> bool:
    # peft's rule for a list of target names: exact name or suffix after a dot
    return any(name == t or name.endswith("." + t) for t in targets)


def _layer_of(name: str, prefix: str) -> int | None:
    # "model.layers.3.self_attn.q_proj" with prefix "model.layers" -> 3; None outside the blocks.
    if not name.startswith(prefix + "."):
        return None
    match = _LAYER_INDEX.match(name[len(prefix) :])
    return int(match.group(1)) if match else None


class FinetuneMethod(ABC):
    """How a model is finetuned: which parameters train, and how the trained part is saved and merged.

    Args:
        layers: Decoder blocks the method may change; default all.

    """

    def __init__(self, layers: LayerGroup | list[int] | None = None) -> None:
        self.layers = layer_group(layers)
        self.resolved_layers: list[int] | None = None  # set by apply()

    def resolve(self, model: nn.Module) -> list[int]:
        """The method's 0-based blocks for ``model`` (raises ``ValueError`` on an empty/out-of-range group)."""
        return self.layers.resolve(len(find_decoder_layers(model)))

    @abstractmethod
    def apply(self, model: nn.Module) -> nn.Module:
        """Make exactly the method's parameters trainable; returns the model to train (maybe wrapped)."""

    @abstractmethod
    def save(self, model: nn.Module, directory: str | Path) -> None:
        """Write the trained part of ``model`` (as returned by :meth:`apply`) to ``directory``."""

    @abstractmethod
    def load(self, model: nn.Module, directory: str | Path) -> nn.Module:
        """:meth:`apply` to a fresh base ``model``, then restore what :meth:`save` wrote; returns the model."""

    def merge(self, model: nn.Module) -> nn.Module:
        """A plain model (no adapter wrappers) with the trained weights folded in."""
        return model

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "resolved_layers" and v is not None)
        return f"{type(self).__name__}({args})"

    def describe(self, model: nn.Module) -> str:
        """Human-readable summary, e.g. ``LayerFinetune on layers 0-5 of 18``."""
        return f"{type(self).__name__} on {self.layers.describe(len(find_decoder_layers(model)))}"


class LoRA(FinetuneMethod):
    """LoRA adapters (peft) on the linear modules of the selected decoder blocks; all else frozen.

    Defaults follow PAPER.md §5: r 16, alpha 16, dropout 0.1. Blocks are chosen with peft's
    ``layers_to_transform`` and ``layers_pattern`` (the path of the block ModuleList, found generically).

    Args:
        layers: Decoder blocks that get adapters; default all.
        r: LoRA rank.
        alpha: LoRA scaling numerator (the update is scaled by ``alpha / r``).
        dropout: Dropout on the adapter input.
        target_modules: Module names inside a block to adapt (a name matches by suffix, e.g. ``q_proj`` or
            ``self_attn.q_proj``); default every ``nn.Linear``/``Conv1D`` inside the selected blocks.
        bias: Which biases train (peft's ``bias``).

    """

    def __init__(
        self,
        layers: LayerGroup | list[int] | None = None,
        r: int = 16,
        alpha: float = 16.0,
        dropout: float = 0.1,
        target_modules: list[str] | None = None,
        bias: Literal["none", "all", "lora_only"] = "none",
    ) -> None:
        super().__init__(layers)
        if r < 1:
            raise ValueError(
                f"LoRA rank r must be >= 1, got {r}: set model.init_args.method.init_args.r (the paper's 16)."
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(
                f"LoRA dropout must be in [0, 1), got {dropout}: set model.init_args.method.init_args.dropout "
                "(the paper's 0.1)."
            )
        if target_modules is not None and not target_modules:
            raise ValueError("target_modules is empty: give module names or leave it unset for the default.")
        self.r, self.alpha, self.dropout, self.bias = r, alpha, dropout, bias
        self.target_modules = list(target_modules) if target_modules is not None else None

    def lora_config(self, model: nn.Module) -> LoraConfig:
        """The peft config for ``model`` (resolves the layer group and the target modules)."""
        layers = self.resolve(model)
        targets = self.target_modules if self.target_modules is not None else default_target_modules(model, layers)
        path = decoder_layers_path(model)
        blocks = find_decoder_layers(model)
        matched = [m for i in layers for n, m in blocks[i].named_modules() if _matches(n, targets)]
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(targets),
            layers_to_transform=list(layers),  # a list, so layer 0 alone is [0], never a falsy 0
            layers_pattern=re.escape(path),
            fan_in_fan_out=bool(matched) and all(isinstance(m, Conv1D) for m in matched),
            bias=self.bias,
        )

    def apply(self, model: nn.Module) -> nn.Module:
        """Wrap ``model`` in a ``PeftModel`` with adapters on exactly the selected blocks.

        Raises:
            ValueError: if the group is empty/out of range or the targets match nothing in those blocks.

        """
        if isinstance(model, PeftModel):
            raise ValueError("the model already has adapters: apply LoRA to the base model once.")
        config = self.lora_config(model)
        layers = list(config.layers_to_transform)
        prefix = decoder_layers_path(model)
        peft_model = get_peft_model(model, config)
        touched = {_layer_of(name, prefix) for name in lora_targets(peft_model)}
        if None in touched or touched != set(layers):
            inside = sorted(t for t in touched if t is not None)
            raise ValueError(
                f"LoRA target_modules {config.target_modules} adapted blocks {inside} (and "
                f"{'some' if None in touched else 'no'} modules outside the blocks), expected exactly {layers}."
            )
        self.resolved_layers = layers
        return peft_model

    def save(self, model: nn.Module, directory: str | Path) -> None:
        """Save the adapter (``adapter_config.json`` + ``adapter_model.safetensors``)."""
        if not isinstance(model, PeftModel):
            raise TypeError("LoRA.save expects the PeftModel returned by LoRA.apply.")
        model.save_pretrained(str(directory))

    def load(self, model: nn.Module, directory: str | Path) -> nn.Module:
        """Attach a saved adapter to a fresh base ``model``, trainable as after :meth:`apply`.

        Raises:
            ValueError: if the adapter adapts other blocks than this method selects for ``model``.

        """
        layers = self.resolve(model)
        peft_model = PeftModel.from_pretrained(model, str(directory), is_trainable=True)
        saved = peft_model.peft_config["default"].layers_to_transform
        if saved is not None and sorted(saved) != layers:
            raise ValueError(
                f"the adapter in {directory} adapts layers {sorted(saved)}, but {self!r} selects {layers}."
            )
        self.resolved_layers = layers
        return peft_model

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold the adapters into the base weights and drop the peft wrappers."""
        return model.merge_and_unload() if isinstance(model, PeftModel) else model

    def describe(self, model: nn.Module) -> str:
        """E.g. ``LoRA r=16 alpha=16 on layers 0-5 of 18``."""
        base = model.get_base_model() if isinstance(model, PeftModel) else model
        return f"LoRA r={self.r} alpha={self.alpha:g} on {self.layers.describe(len(find_decoder_layers(base)))}"


class _StateDictMethod(FinetuneMethod):
    """Methods that train ordinary parameters in place: save/load the trainable ones as safetensors."""

    FILE = "trainable.safetensors"

    def save(self, model: nn.Module, directory: str | Path) -> None:
        """Write the trainable parameters to ``directory/trainable.safetensors``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        names = trainable_parameter_names(model)
        # clone: safetensors refuses tensors that share storage (tied embeddings)
        tensors = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items() if k in names}
        save_file(tensors, str(directory / self.FILE))

    def load(self, model: nn.Module, directory: str | Path) -> nn.Module:
        """:meth:`apply` to ``model``, then load the saved parameters (exactly the trainable ones)."""
        model = self.apply(model)
        tensors = load_file(str(Path(directory) / self.FILE))
        expected = trainable_parameter_names(model)
        if set(tensors) != expected:
            raise ValueError(
                f"{directory} holds parameters {sorted(set(tensors) ^ expected)[:4]}... that differ from what "
                f"{self!r} trains: load with the method that saved them."
            )
        model.load_state_dict(tensors, strict=False)
        return model


class LayerFinetune(_StateDictMethod):
    """Plain finetuning of every parameter of the selected decoder blocks; everything else frozen.

    Args:
        layers: Decoder blocks that train; default all (embeddings, final norm and head stay frozen).

    """

    def apply(self, model: nn.Module) -> nn.Module:
        """Freeze the model, then unfreeze the selected blocks."""
        layers = self.resolve(model)
        blocks = find_decoder_layers(model)
        model.requires_grad_(False)
        for i in layers:
            blocks[i].requires_grad_(True)
        self.resolved_layers = layers
        return model


class FullFinetune(_StateDictMethod):
    """Every parameter trains (embeddings, all blocks, head): the memory baseline for LoRA."""

    def __init__(self) -> None:
        super().__init__(AllLayers())

    def apply(self, model: nn.Module) -> nn.Module:
        """Unfreeze everything."""
        model.requires_grad_(True)
        self.resolved_layers = self.resolve(model)
        return model

    def describe(self, model: nn.Module) -> str:
        """``FullFinetune``."""
        return "FullFinetune (all parameters)"


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, tied parameters counted once."""
    seen: dict[int, torch.nn.Parameter] = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in seen.values())
    return sum(p.numel() for p in seen.values() if p.requires_grad), total
