"""LightningModules: training and probing logic, with the architecture injected."""

from lcd.lit.pretrain import LitPretrain

__all__ = ["LitPretrain"]
