"""H-Net: the recursive U-shaped byte model (encoder -> chunk -> inner -> dechunk -> decoder)."""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100  # label of positions without a target (same value as data_pipeline.batch)

from .dtypes import upcast
from .block import Isotropic
from .config import HNetConfig
from .dynamic_chunking import RoutingModule, RoutingOutput, chunk, dechunk, ratio_loss, ste
from .sequence import PackedSeqs, check_cu_seqlens


class LevelContext(NamedTuple):
    """What an outer level's decoder needs from its encoder: the skip path (paper section 2.2).

    seqs / inner_seqs: the documents at this level and after chunking; residual: residual_proj
    of the encoder output (fp32, (1, T, D)); routing: this level's boundaries; d_in: the width
    the level was entered with (the extra `pad_dimension` dims are sliced off on the way out);
    dtype: the hidden dtype of the level.
    """

    seqs: PackedSeqs
    inner_seqs: PackedSeqs
    residual: torch.Tensor
    routing: RoutingOutput
    d_in: int
    dtype: torch.dtype


def pad_to_level(level, hidden: torch.Tensor) -> torch.Tensor:
    """Widens hidden states entering `level` with its learned `pad_dimension` (D^{s} - D^{s-1} dims)."""
    if level.pad_dimension is None:
        return hidden
    return torch.cat([hidden, level.pad_dimension.to(hidden.dtype).expand(*hidden.shape[:-1], -1)], dim=-1)


def encode_level(level, hidden: torch.Tensor, seqs: PackedSeqs) -> tuple[torch.Tensor, PackedSeqs, LevelContext]:
    """The way in through an outer level: pad, encoder, residual projection, routing, chunk.
    hidden: (1, T, D_outer) -> the chunked (1, M, D_level), the inner documents, the skip context.
    `level` is an outer `HNet` (or any module with its encoder, routing_module, residual_proj and
    pad_dimension)."""
    d_in = hidden.shape[-1]
    hidden = level.encoder(pad_to_level(level, hidden), seqs)
    with torch.autocast(hidden.device.type, enabled=False):  # the skip path stays fp32 under autocast
        residual = level.residual_proj(hidden.to(level.residual_proj.weight.dtype))
    routing = level.routing_module(hidden, seqs)
    inner, inner_seqs = chunk(hidden, routing, seqs)
    routing = routing._replace(cu_lists=(seqs.cu_list(), inner_seqs.cu_list()))
    return inner, inner_seqs, LevelContext(seqs, inner_seqs, residual, routing, d_in, hidden.dtype)


def decode_level(level, inner: torch.Tensor, ctx: LevelContext) -> torch.Tensor:
    """The way out: dechunk (EMA + upsample), confidence STE, add the residual, decoder, slice
    back to the outer width. inner: (1, M, D_level) -> (1, T, D_outer)."""
    out = dechunk(inner, ctx.routing, ctx.inner_seqs)
    hidden = (out * ste(ctx.routing.selected_probs).unsqueeze(-1) + ctx.residual).to(ctx.dtype)
    return level.decoder(hidden, ctx.seqs)[..., :ctx.d_in]


class ResidualProjection(nn.Linear):
    """The skip path's projection (paper section 2.2), fp32 whatever the model dtype, as in the
    public code. A class of its own: DeepSpeed's torch-autocast support tags the parameters of
    exact `nn.Linear` instances with a bf16 communication dtype (ZeRO-3 would gather them in
    bf16), and an exact-class match leaves a subclass alone."""


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
            self.residual_proj = ResidualProjection(self.d_model, self.d_model, device=device, dtype=torch.float32)
        extra = self.d_model - config.d_model[stage - 1] if stage > 0 else 0
        self.pad_dimension = nn.Parameter(torch.zeros(extra, **fk)) if extra > 0 else None

    def forward(self, hidden: torch.Tensor, seqs: PackedSeqs) -> tuple[torch.Tensor, list[RoutingOutput]]:
        """hidden: (1, T, D_outer) -> (1, T, D_outer), and the routing outputs of this level and
        the levels inside it (outer first)."""
        if self.is_innermost:
            d_in = hidden.shape[-1]
            return self.main_network(pad_to_level(self, hidden), seqs)[..., :d_in], []
        inner, inner_seqs, ctx = encode_level(self, hidden, seqs)
        inner, inner_routing = self.main_network(inner, inner_seqs)
        return decode_level(self, inner, ctx), [ctx.routing, *inner_routing]

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
        seqs = self.check_inputs(input_ids, cu_seqlens, labels)
        hidden, routing = self.backbone(self.embed(input_ids), seqs)
        out = self.lm_output(hidden, input_ids.shape, labels)
        out.stages, _ = self.stage_statistics(routing, n_real)
        out.ratio_loss = self.weighted_ratio_loss(out.stages, out.logits)
        return out

    def check_inputs(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None,
                     labels: torch.Tensor | None) -> PackedSeqs:
        """Validates a batch (ValueError naming the problem); returns its documents at level 0."""
        return check_inputs(self.config, input_ids, cu_seqlens, labels)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) byte ids -> (1, B*L, D0): rows laid end to end (packed rows arrive as uint8)."""
        return self.embeddings(input_ids.reshape(1, -1).long())

    def lm_output(self, hidden: torch.Tensor, shape, labels: torch.Tensor | None) -> HNetOutput:
        return lm_output(self.lm_head, hidden, shape, labels)

    def stage_statistics(self, routing: list[RoutingOutput], n_real: int | None = None,
                         first_stage: int = 0) -> tuple[list[StageStats], int | None]:
        return stage_statistics(self.config, routing, n_real, first_stage)

    def weighted_ratio_loss(self, stats: list[StageStats], like: torch.Tensor) -> torch.Tensor:
        return weighted_ratio_loss(self.config, stats, like)

def check_inputs(config: HNetConfig, input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None,
                 labels: torch.Tensor | None) -> PackedSeqs:
    """Validates a batch (ValueError naming the problem); returns its documents at level 0."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer byte ids, got {input_ids.dtype}")
    if input_ids.numel() == 0:
        raise ValueError("input_ids is empty")
    # uint8 ids (the packed rows of the data pipeline) are byte ids by their dtype: no device
    # read is needed to check them. Ids of any other dtype are read once, for both bounds.
    if not (input_ids.dtype == torch.uint8 and config.vocab_size >= 256):
        lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()
        if lo < 0 or hi >= config.vocab_size:
            raise ValueError(f"input_ids must be byte ids in 0..{config.vocab_size - 1}, got values in [{lo}, {hi}]")
    B, L = input_ids.shape
    if cu_seqlens is None:
        cu = [i * L for i in range(B + 1)]
    else:
        if B != 1:
            raise ValueError(f"with cu_seqlens, input_ids must be one packed row (1, T), got {tuple(input_ids.shape)}")
        cu = check_cu_seqlens(cu_seqlens, L)  # the packer's host tensor: read without a synchronisation
    if labels is not None and labels.shape != input_ids.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} differs from input_ids shape {tuple(input_ids.shape)}")
    device_cu = cu_seqlens if cu_seqlens is not None and cu_seqlens.device == input_ids.device else None
    return PackedSeqs.from_host(cu, input_ids.device, device_cu)


def lm_output(lm_head: nn.Module, hidden: torch.Tensor, shape, labels: torch.Tensor | None) -> HNetOutput:
    """lm_head and, with labels, the summed next-byte cross-entropy. hidden: (1, B*L, D0)."""
    return next_byte_loss(lm_head(hidden), shape, labels)


def next_byte_loss(logits: torch.Tensor, shape, labels: torch.Tensor | None) -> HNetOutput:
    """The output for LM-head logits (1, B*L, 256): logits as fp32 (B, L, 256) and, with labels,
    loss_sum (summed cross-entropy over targets, nats), n_targets and loss (their mean)."""
    B, L = shape
    logits = logits.float().view(B, L, -1)
    out = HNetOutput(logits=logits)
    if labels is not None:
        flat = labels.reshape(-1).to(logits.device).long()  # packed rows arrive as int16
        out.loss_sum = F.cross_entropy(logits.view(-1, logits.shape[-1]), flat, ignore_index=IGNORE_INDEX,
                                       reduction="sum")
        out.n_targets = (flat != IGNORE_INDEX).sum()
        out.loss = out.loss_sum / out.n_targets.clamp(min=1)
    return out


def stage_statistics(config: HNetConfig, routing: list[RoutingOutput], n_real: int | None = None,
                     first_stage: int = 0) -> tuple[list[StageStats], int | None]:
    """Statistics of consecutive routing levels starting at `first_stage`; with n_real (the real
    positions of the first of them, padding at the row's end) only real positions count.
    Returns the statistics and the real positions of the level after the last."""
    stats, n = [], n_real
    for r, target in zip(routing, config.ratio_targets[first_stage:]):
        if n is not None:  # padding sits at the row's end at every level (it is its own document)
            cut = RoutingOutput(r.boundary_prob[:n], r.boundary_mask[:n], r.selected_probs[:n])
            n, r = real_chunks(r, n), cut
        stats.append(_stage_stats(r, target))
    return stats, n


def real_chunks(r: RoutingOutput, n: int) -> int:
    """Chunks of the first n positions of a level. Where n ends a document (the padding is one),
    the next level's boundaries on the host give it; else it is counted on the device (one read:
    only for routing without its boundaries, received from another pipeline rank in evaluation)."""
    if r.cu_lists is not None:
        cu, next_cu = r.cu_lists
        k = bisect.bisect_left(cu, n)
        if k < len(cu) and cu[k] == n:
            return next_cu[k]
    return int(r.boundary_mask[:n].sum())


def weighted_ratio_loss(config: HNetConfig, stats: list[StageStats], like: torch.Tensor) -> torch.Tensor:
    """alpha * sum over the given stages of eq. 10 (a zero scalar without stages)."""
    return (config.ratio_alpha * sum(s.ratio_loss for s in stats)) if stats else like.new_zeros(())


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
