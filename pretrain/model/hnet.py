"""H-Net: the recursive U-shaped byte model (encoder -> chunk -> inner -> dechunk -> decoder)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100  # label of positions without a target (same value as data_pipeline.batch)

from .dtypes import upcast
from .block import Isotropic
from .config import HNetConfig
from .dynamic_chunking import RoutingModule, RoutingOutput, chunk, dechunk, ratio_loss, ste
from .sequence import PackedSeqs, check_cu_seqlens


class HNet(nn.Module):
    """One hierarchy level. Outer levels hold encoder, routing, main_network (the next level),
    decoder and residual_proj; the innermost level holds only main_network (an Isotropic).
    Attribute names are the public ones so public state dicts load unchanged."""

    def __init__(self, config: HNetConfig, stage: int, device=None, dtype=None):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.stage = stage
        self.d_model = config.d_model[stage]
        layout = config.stage_layout(stage)
        self.is_innermost = len(layout) == 1
        if self.is_innermost:
            self.main_network = Isotropic(layout[0], config, stage, **fk)
        else:
            self.encoder = Isotropic(layout[0], config, stage, **fk)
            self.main_network = HNet(config, stage + 1, **fk)
            self.decoder = Isotropic(layout[2], config, stage, **fk)
            self.routing_module = RoutingModule(self.d_model, **fk)
            # The skip connection runs in fp32 whatever the model dtype.
            self.residual_proj = nn.Linear(self.d_model, self.d_model, device=device, dtype=torch.float32)
        extra = self.d_model - config.d_model[stage - 1] if stage > 0 else 0
        self.pad_dimension = nn.Parameter(torch.zeros(extra, **fk)) if extra > 0 else None

    def forward(self, hidden: torch.Tensor, seqs: PackedSeqs) -> tuple[torch.Tensor, list[RoutingOutput]]:
        """hidden: (1, T, D_outer) -> (1, T, D_outer), and the routing outputs of this level and
        the levels inside it (outer first)."""
        d_in = hidden.shape[-1]
        if self.pad_dimension is not None:
            hidden = torch.cat([hidden, self.pad_dimension.to(hidden.dtype).expand(*hidden.shape[:-1], -1)], dim=-1)
        if self.is_innermost:
            return self.main_network(hidden, seqs)[..., :d_in], []

        hidden = self.encoder(hidden, seqs)
        with torch.autocast(hidden.device.type, enabled=False):  # the skip path stays fp32 under autocast
            residual = self.residual_proj(hidden.to(self.residual_proj.weight.dtype))
        routing = self.routing_module(hidden, seqs)
        inner, inner_seqs = chunk(hidden, routing, seqs)
        inner, inner_routing = self.main_network(inner, inner_seqs)
        out = dechunk(inner, routing, inner_seqs)
        hidden = (out * ste(routing.selected_probs).unsqueeze(-1) + residual).to(hidden.dtype)
        hidden = self.decoder(hidden, seqs)
        return hidden[..., :d_in], [routing, *inner_routing]

    def isotropic_networks(self) -> list[Isotropic]:
        if self.is_innermost:
            return [self.main_network]
        return [self.encoder, self.decoder, *self.main_network.isotropic_networks()]


@dataclass
class StageStats:
    """Routing statistics of one stage over the real positions of the batch.

    boundary_mask (T_s,) bool, boundary_prob (T_s,), F = mean(b), G = mean(p) (scalars),
    compression_ratio = positions in / chunks out (scalar, detached), ratio_loss (unweighted eq. 10).
    """

    boundary_mask: torch.Tensor
    boundary_prob: torch.Tensor
    F: torch.Tensor
    G: torch.Tensor
    compression_ratio: torch.Tensor
    ratio_loss: torch.Tensor


@dataclass
class HNetOutput:
    logits: torch.Tensor  # (B, L, 256) fp32
    loss: torch.Tensor | None = None  # mean next-byte cross-entropy over targets, nats
    loss_sum: torch.Tensor | None = None  # summed cross-entropy (for token-weighted accumulation)
    n_targets: torch.Tensor | None = None  # number of real targets
    ratio_loss: torch.Tensor | None = None  # alpha * sum over stages of eq. 10
    stages: list[StageStats] = field(default_factory=list)


class HNetForCausalLM(nn.Module):
    """Byte embeddings -> H-Net backbone -> lm_head."""

    def __init__(self, config: HNetConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        d0 = config.d_model[0]
        self.embeddings = nn.Embedding(config.vocab_size, d0, device=device, dtype=dtype)
        self.backbone = HNet(config, 0, device=device, dtype=dtype)
        self.lm_head = nn.Linear(d0, config.vocab_size, bias=False, device=device, dtype=dtype)
        if config.tie_embeddings:
            self.lm_head.weight = self.embeddings.weight
        if self.embeddings.weight.device.type != "meta":
            self.init_weights()

    # ---------------------------------------------------------------------- init
    @torch.no_grad()
    def init_weights(self, initializer_range: float = 0.02) -> None:
        """Embeddings N(0, 1); linear layers N(0, 0.02); out_proj and fc2 divided by
        sqrt(residual additions of this network and every network around it); routing q/k
        identity; residual_proj weight zero; Mamba-2's own dt/A/D init."""
        from .mamba2 import Mamba2

        nn.init.normal_(self.lm_head.weight, std=initializer_range)
        nn.init.normal_(self.embeddings.weight, std=1.0)

        def init_level(level: HNet, parent_residuals: int) -> None:
            if level.is_innermost:
                n_res, networks = parent_residuals + level.main_network.height, [level.main_network]
            else:
                n_res = parent_residuals + level.encoder.height + level.decoder.height
                networks = [level.encoder, level.decoder]
                level.routing_module.reset_parameters()
                nn.init.zeros_(level.residual_proj.weight)
                init_level(level.main_network, n_res)
            for net in networks:
                for name, m in net.named_modules():
                    if isinstance(m, nn.Linear):
                        is_out = name.endswith("out_proj") or name.endswith("fc2")
                        nn.init.normal_(m.weight, std=initializer_range / (n_res ** 0.5 if is_out else 1.0))
                    elif isinstance(m, Mamba2):
                        m.reset_ssm_parameters()
            if level.pad_dimension is not None:
                nn.init.zeros_(level.pad_dimension)

        init_level(self.backbone, 0)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        for net in self.backbone.isotropic_networks():
            net.activation_checkpointing = enabled

    # ------------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, n_real: int | None = None) -> HNetOutput:
        """input_ids: (B, L) byte ids, each row one document; or (1, T) packed documents
        described by cu_seqlens (int32, n_docs + 1). labels: same shape as input_ids, next byte
        or -100 where there is no target. n_real: in a packed row whose end is padding (its own
        cu_seqlens segment), the number of real positions; routing statistics (F, G, ratio loss,
        compression) then count real positions only."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must hold integer byte ids, got {input_ids.dtype}")
        if input_ids.numel() == 0:
            raise ValueError("input_ids is empty")
        lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()  # one device read for both bounds
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"input_ids must be byte ids in 0..{self.config.vocab_size - 1}, got values in [{lo}, {hi}]")
        B, L = input_ids.shape
        if cu_seqlens is None:
            cu_seqlens = torch.arange(B + 1, device=input_ids.device, dtype=torch.int32) * L
        else:
            if B != 1:
                raise ValueError(f"with cu_seqlens, input_ids must be one packed row (1, T), got {tuple(input_ids.shape)}")
            check_cu_seqlens(cu_seqlens, L)
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} differs from input_ids shape {tuple(input_ids.shape)}")
        seqs = PackedSeqs.from_cu_seqlens(cu_seqlens.to(input_ids.device))

        hidden = self.embeddings(input_ids.reshape(1, B * L).long())  # packed rows arrive as uint8
        hidden, routing = self.backbone(hidden, seqs)
        logits = self.lm_head(hidden).float().view(B, L, -1)

        out = HNetOutput(logits=logits)
        stats, n = [], n_real
        for r, target in zip(routing, self.config.ratio_targets):
            if n is not None:  # padding sits at the row's end at every level (it is its own document)
                r = RoutingOutput(r.boundary_prob[:n], r.boundary_mask[:n], r.selected_probs[:n])
                n = int(r.boundary_mask.sum())
            stats.append(self._stage_stats(r, target))
        out.stages = stats
        out.ratio_loss = (self.config.ratio_alpha * sum(s.ratio_loss for s in stats)) if stats else logits.new_zeros(())
        if labels is not None:
            flat = labels.reshape(-1).to(logits.device).long()  # packed rows arrive as int16
            out.loss_sum = F.cross_entropy(logits.view(-1, logits.shape[-1]), flat, ignore_index=IGNORE_INDEX,
                                           reduction="sum")
            out.n_targets = (flat != IGNORE_INDEX).sum()
            out.loss = out.loss_sum / out.n_targets.clamp(min=1)
        return out

    @staticmethod
    def _stage_stats(r: RoutingOutput, target: float) -> StageStats:
        prob = upcast(r.boundary_prob)
        if r.boundary_mask.numel() == 0:  # a padding-only row: no statistics, no ratio loss
            zero = prob.sum()
            return StageStats(r.boundary_mask, r.boundary_prob, F=zero.detach(), G=zero.detach(),
                              compression_ratio=zero.detach(), ratio_loss=zero)
        F_ = r.boundary_mask.to(prob.dtype).mean()
        G = prob.mean()
        n_chunks = r.boundary_mask.sum().clamp(min=1)
        ratio = (r.boundary_mask.numel() / n_chunks.to(prob.dtype)).detach()
        return StageStats(boundary_mask=r.boundary_mask, boundary_prob=r.boundary_prob, F=F_, G=G,
                          compression_ratio=ratio, ratio_loss=ratio_loss(F_, G, target))
