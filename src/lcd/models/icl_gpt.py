"""The synthetic ICL transformer: linear read-in -> GPT-2 decoder (transformers) -> linear read-out.

Tokens follow Garg et al. (2022): x_i and y_i are separate interleaved tokens, ``y_i`` zero-padded to
D dims, so a prompt of n pairs is the sequence ``x_0, y_0, x_1, y_1, ...`` of length 2n. The
prediction of ``y_i`` is read out at the ``x_i`` token, which sees every earlier pair but not ``y_i``.
With ``y_slot="own"`` tokens get one extra coordinate that holds y (x tokens carry 0 there), so y no
longer shares a read-in column with input coordinate 0; with ``y_slot="all"`` y fills every coordinate,
so it shares its read-in with every concept's inputs alike.
The backbone is transformers' ``GPT2Model``, so :mod:`lcd.activations` reaches its residual stream
exactly as it does for any pretrained HF decoder.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from transformers import GPT2Config, GPT2Model


class ICLTransformer(nn.Module):
    """GPT-2 style causal decoder that regresses y_i from the in-context pairs before it.

    The paper's model (PAPER.md §2) is ``n_layers=12, d_model=256, n_heads=8`` (about 9.5M
    parameters); see ``configs/synthetic/model_paper.yaml``.

    Args:
        n_dims: Input dimension D of the task.
        n_pairs: Longest prompt, in (x, y) pairs (sets the position embedding table to 2 * n_pairs).
        n_layers: Number of decoder blocks.
        d_model: Residual stream width.
        n_heads: Attention heads per block.
        dropout: Dropout in embeddings, attention and residual branches.
        init_std: Standard deviation of the backbone's initial weights (transformers'
            ``initializer_range``; GPT-2 uses 0.02, tuned for width 768). Small models leave the
            initial loss plateau much sooner with a larger value (the CPU preset uses 0.1 at width 64).
        pos_init_std: Standard deviation of the initial position embeddings (default: ``init_std``).
            The CPU preset uses 0.5, which left the plateau sooner than 0.02; 2.0 was too large
            (the model stayed on the plateau).
        y_slot: Where a y token puts its value. ``"first"`` (Garg et al., the paper's setup): coordinate
            0 of a D-dim token, the coordinate x tokens use for x_0. ``"own"``: an extra (D+1)-th
            coordinate that is 0 in x tokens. ``"all"``: y in every one of the D coordinates. With
            ``"first"`` the concept whose basis contains x_0 shares its read-in column with y and, on the
            small CPU preset, is the one solved first and the one encoded; ``"all"`` gives every concept
            that shared column.

    """

    def __init__(
        self,
        n_dims: int = 16,
        n_pairs: int = 20,
        n_layers: int = 12,
        d_model: int = 256,
        n_heads: int = 8,
        dropout: float = 0.0,
        init_std: float = 0.02,
        pos_init_std: float | None = None,
        y_slot: Literal["first", "own", "all"] = "first",
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads}).")
        if min(n_dims, n_pairs, n_layers, d_model, n_heads) < 1:
            raise ValueError("n_dims, n_pairs, n_layers, d_model and n_heads must all be >= 1.")
        if init_std <= 0 or (pos_init_std is not None and pos_init_std <= 0):
            raise ValueError(f"init_std ({init_std}) and pos_init_std ({pos_init_std}) must be > 0.")
        if y_slot not in ("first", "own", "all"):
            raise ValueError(f"y_slot must be 'first', 'own' or 'all', got {y_slot!r}.")
        self.n_dims, self.n_pairs, self.y_slot = n_dims, n_pairs, y_slot
        config = GPT2Config(
            vocab_size=1,  # inputs come through read_in; a real vocabulary would only waste parameters
            n_positions=2 * n_pairs,
            n_embd=d_model,
            n_layer=n_layers,
            n_head=n_heads,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
            initializer_range=init_std,
            use_cache=False,
            bos_token_id=None,
            eos_token_id=None,
        )
        config._attn_implementation = "sdpa"  # PyTorch's fused scaled_dot_product_attention
        self.read_in = nn.Linear(n_dims + (y_slot == "own"), d_model)
        self.backbone = GPT2Model(config)
        if pos_init_std is not None:
            nn.init.normal_(self.backbone.wpe.weight, std=pos_init_std)
        self.backbone.wte.requires_grad_(False)  # token embeddings are unused (inputs_embeds); DDP needs them frozen
        self.read_out = nn.Linear(d_model, 1)

    @property
    def n_layers(self) -> int:
        """Number of decoder blocks."""
        return self.backbone.config.n_layer

    @staticmethod
    def x_positions(n_pairs: int) -> torch.Tensor:
        """Token index of each x_i in the interleaved sequence (where y_i is predicted)."""
        return torch.arange(n_pairs) * 2

    def embed_tokens(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """Interleave x and zero-padded y tokens: (B, n, D), (B, n) -> (B, 2n, D), or D+1 with ``y_slot="own"``."""
        if self.y_slot == "own":
            xs = nn.functional.pad(xs, (0, 1))  # x tokens carry 0 in the y coordinate
        b, n, d = xs.shape
        if self.y_slot == "all":
            ys_wide = ys.unsqueeze(-1).expand_as(xs)  # y_i in every coordinate
        else:
            ys_wide = torch.zeros_like(xs)
            ys_wide[..., 0 if self.y_slot == "first" else -1] = ys  # y_i in its coordinate, zeros elsewhere
        return torch.stack([xs, ys_wide], dim=2).reshape(b, 2 * n, d)

    def forward(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """Predict every y_i from the pairs before it.

        Args:
            xs: (B, n, D) inputs.
            ys: (B, n) targets (only earlier ones are visible to each prediction).

        Returns:
            (B, n) predictions of ``ys``.

        """
        if xs.shape[1] > self.n_pairs:
            raise ValueError(f"prompt has {xs.shape[1]} pairs but the model was built for n_pairs={self.n_pairs}.")
        h = self.read_in(self.embed_tokens(xs, ys))  # (B, 2n, d_model)
        h = self.backbone(inputs_embeds=h).last_hidden_state  # (B, 2n, d_model)
        return self.read_out(h[:, ::2]).squeeze(-1)  # x tokens -> (B, n)
