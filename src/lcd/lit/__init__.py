"""LightningModules: training and probing logic, with the architecture injected."""

from lcd.lit.finetune import LitFinetune
from lcd.lit.pretrain import LitPretrain
from lcd.lit.probe import LitProbe

__all__ = ["LitFinetune", "LitPretrain", "LitProbe"]
