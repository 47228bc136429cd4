"""Model architectures: the synthetic ICL transformer and loaders for pretrained causal LMs."""

from lcd.models.icl_gpt import ICLTransformer

__all__ = ["ICLTransformer"]
