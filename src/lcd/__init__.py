"""lcd: train and probe transformers for concept encoding and decoding in in-context learning."""

__version__ = "0.1.0"
