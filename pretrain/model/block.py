"""Pre-norm residual blocks and the isotropic networks (encoder, decoder, main) built from them."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .dtypes import upcast
from .attention import CausalMHA, SwiGLU
from .config import HNetConfig, parse_layout
from .mamba2 import Mamba2
from .norm import RMSNorm
from .sequence import PackedSeqs


class Block(nn.Module):
    """residual += hidden; hidden = mixer(norm1(residual)); and, with an MLP (upper-case letter),
    residual += hidden; hidden = mlp(norm2(residual)). The residual stream is kept in fp32."""

    def __init__(self, letter: str, d_model: int, config: HNetConfig, stage: int, device=None, dtype=None):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.letter = letter
        self.norm1 = RMSNorm(d_model, eps=1e-5, **fk)
        if letter in "mM":
            s = config.ssm_cfg
            self.mixer = Mamba2(d_model, d_state=s.d_state, d_conv=s.d_conv, expand=s.expand, headdim=s.headdim,
                                ngroups=s.ngroups, chunk_size=s.chunk_size, **fk)
        else:
            a = config.attn_cfg
            self.mixer = CausalMHA(d_model, a.num_heads[stage], rotary_emb_dim=a.rotary_emb_dim[stage],
                                   window_size=a.window_size[stage], **fk)
        if letter in "MT":
            self.norm2 = RMSNorm(d_model, eps=1e-5, **fk)
            self.mlp = SwiGLU(d_model, config.d_intermediate[stage], **fk)
        else:
            self.norm2 = None
            self.mlp = None

    @property
    def residual_adds(self) -> int:
        return 2 if self.mlp is not None else 1

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, seqs: PackedSeqs):
        residual = upcast(hidden) if residual is None else residual + upcast(hidden)
        hidden = self.mixer(self.norm1(residual).to(hidden.dtype), seqs)
        if self.mlp is not None:
            residual = residual + upcast(hidden)
            hidden = self.mlp(self.norm2(residual).to(hidden.dtype))
        return hidden, residual


class Isotropic(nn.Module):
    """A stack of blocks from a layout string like 'T1m4', ended by an RMSNorm over the last residual."""

    def __init__(self, layout: str, config: HNetConfig, stage: int, device=None, dtype=None):
        super().__init__()
        d_model = config.d_model[stage]
        letters = [letter for letter, count in parse_layout(layout) for _ in range(count)]
        self.layers = nn.ModuleList(Block(letter, d_model, config, stage, device=device, dtype=dtype)
                                    for letter in letters)
        self.rmsnorm = RMSNorm(d_model, eps=1e-5, device=device, dtype=dtype)
        self.activation_checkpointing = False

    @property
    def height(self) -> int:
        """How many times the blocks add to the residual stream (used to scale output projections at init)."""
        return sum(layer.residual_adds for layer in self.layers)

    def forward(self, hidden: torch.Tensor, seqs: PackedSeqs) -> torch.Tensor:
        residual = None
        for layer in self.layers:
            if self.activation_checkpointing and torch.is_grad_enabled():
                hidden, residual = checkpoint(layer, hidden, residual, seqs, use_reentrant=False)
            else:
                hidden, residual = layer(hidden, residual, seqs)
        final = upcast(hidden) if residual is None else residual + upcast(hidden)
        return self.rmsnorm(final).to(hidden.dtype)
