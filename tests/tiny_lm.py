"""Tiny randomly initialised causal LMs and an offline byte-level tokenizer, saved like real models."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<bos>", "<eos>"]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per byte, no merges) built without any download."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", padding_side="left"
    )


def tiny_config(arch: str, vocab_size: int, n_layers: int = 2):
    """An ``n_layers``-layer, d_model 16 config of ``arch`` (``llama`` or ``gemma3``)."""
    from transformers import Gemma3TextConfig, LlamaConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=n_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if arch == "gemma3":
        layer_types = ["sliding_attention", "full_attention"] * (n_layers // 2) + ["sliding_attention"] * (n_layers % 2)
        return Gemma3TextConfig(**common, sliding_window=16, layer_types=layer_types)
    return LlamaConfig(**common)


def save_tiny_lm(path: Path, arch: str = "llama", seed: int = 0, n_layers: int = 2) -> Path:
    """Save a tiny random model of ``arch`` (``n_layers`` blocks) and the byte tokenizer to ``path``; return it."""
    tok = byte_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tok), n_layers))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
