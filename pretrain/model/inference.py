"""Incremental decoding of an H-Net with cached state at every level, for a batch of rows.

One `step(byte_ids)` advances every row by one byte and returns the next-byte logits. The state
kept per row, level by level (paper section 2; the public code's `step` functions are the model):

- every Mamba-2 layer: the last d_conv inputs of its causal convolution and its SSM state;
- every attention layer: a key/value cache with the row's length, keys older than the layer's
  sliding window masked out (and rotary positions counted per row, per level);
- every routing module: the previous position's encoder output (p_t compares it with the current
  one; a row's first position is a boundary, p = 1);
- every dechunk: the EMA of the inner outputs (eq. 5), which a non-boundary position repeats;
- the inner level steps only for the rows whose boundary fired (index_select, step, index_copy).

The step is written for inference (no autograd) and matches the packed forward (`HNetForCausalLM`)
position by position: tests/model/test_inference.py checks greedy decoding against recomputing
the whole prefix each step. The host syncs per byte are one per level (which rows continue
inward); sampling, stopping and boundary bookkeeping are the caller's (pretrain/sample.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .attention import CausalMHA, apply_rotary, rotary_cos_sin
from .block import Block, Isotropic
from .dtypes import upcast
from .hnet import HNet, HNetForCausalLM, pad_to_level
from .mamba2 import Mamba2


# ----------------------------------------------------------------------------- per-layer state
@dataclass
class MambaState:
    conv: torch.Tensor  # (B, conv_dim, d_conv): the last d_conv inputs, oldest first
    ssm: torch.Tensor  # (B, nheads, headdim, d_state), fp32


@dataclass
class AttnState:
    k: torch.Tensor  # (B, H, capacity, Dh)
    v: torch.Tensor
    length: torch.Tensor  # (B,) int64: keys held (= the row's position at this level)


def _select(state, rows: torch.Tensor):
    """The sub-state of `rows` (a copy)."""
    if isinstance(state, list):
        return [_select(s, rows) for s in state]
    if isinstance(state, torch.Tensor):
        return state.index_select(0, rows)
    if state is None:
        return None
    return type(state)(**{k: _select(v, rows) for k, v in vars(state).items()})


def _scatter(state, rows: torch.Tensor, sub) -> None:
    """Writes the sub-state of `rows` back in place."""
    if isinstance(state, list):
        for s, t in zip(state, sub):
            _scatter(s, rows, t)
    elif isinstance(state, torch.Tensor):
        state.index_copy_(0, rows, sub)
    elif state is not None:
        for k, v in vars(state).items():
            _scatter(v, rows, getattr(sub, k))


def mamba_state(m: Mamba2, batch: int, device, dtype) -> MambaState:
    return MambaState(torch.zeros(batch, m.conv_dim, m.d_conv, device=device, dtype=torch.float32),
                      torch.zeros(batch, m.nheads, m.headdim, m.d_state, device=device, dtype=torch.float32))


def mamba_step(m: Mamba2, u: torch.Tensor, st: MambaState) -> torch.Tensor:
    """u: (B, d_model) -> (B, d_model); updates `st`."""
    zxbcdt = m.in_proj(u)
    z, xBC, dt = torch.split(zxbcdt, [m.d_inner, m.conv_dim, m.nheads], dim=-1)
    st.conv.copy_(torch.roll(st.conv, shifts=-1, dims=-1))
    st.conv[:, :, -1] = upcast(xBC)
    w = upcast(m.conv1d.weight).squeeze(1)  # (conv_dim, d_conv): the last tap multiplies the current input
    xBC = (st.conv * w).sum(-1)
    if m.conv1d.bias is not None:
        xBC = xBC + upcast(m.conv1d.bias)
    xBC = F.silu(xBC).to(u.dtype)
    x, B, C = torch.split(xBC, [m.d_inner, m.ngroups * m.d_state, m.ngroups * m.d_state], dim=-1)
    b = u.shape[0]
    x = upcast(x).reshape(b, m.nheads, m.headdim)
    heads_per_group = m.nheads // m.ngroups
    B = upcast(B).reshape(b, m.ngroups, m.d_state).repeat_interleave(heads_per_group, dim=1)  # (b, nheads, N)
    C = upcast(C).reshape(b, m.ngroups, m.d_state).repeat_interleave(heads_per_group, dim=1)
    dt = F.softplus(upcast(dt) + upcast(m.dt_bias))  # (b, nheads)
    A = -torch.exp(upcast(m.A_log))
    decay = torch.exp(dt * A)  # (b, nheads)
    st.ssm.mul_(decay[:, :, None, None]).add_((dt[:, :, None] * x).unsqueeze(-1) * B.unsqueeze(2))
    y = (st.ssm * C.unsqueeze(2)).sum(-1) + x * upcast(m.D)[None, :, None]  # (b, nheads, headdim)
    y = m.norm(y.to(u.dtype).reshape(b, m.d_inner), z)
    return m.out_proj(y)


def attn_state(a: CausalMHA, batch: int, capacity: int, device, dtype) -> AttnState:
    shape = (batch, a.num_heads, capacity, a.head_dim)
    return AttnState(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype),
                     torch.zeros(batch, dtype=torch.int64, device=device))


def attn_step(a: CausalMHA, x: torch.Tensor, st: AttnState) -> torch.Tensor:
    """x: (B, d_model) -> (B, d_model); appends this position's key and value to the cache."""
    b = x.shape[0]
    qkv = a.Wqkv(x).view(b, 3, a.num_heads, a.head_dim)
    pos = st.length
    if a.rotary_emb_dim > 0:  # q and k rotated together (b, 2, H, Dh), as in CausalMHA.forward
        cos, sin = rotary_cos_sin(pos, a.rotary_emb_dim, a.rotary_base)  # (b, r)
        qk, v = qkv.split([2, 1], dim=1)
        q, k = apply_rotary(qk, cos, sin).unbind(1)
        v = v.squeeze(1)
    else:
        q, k, v = qkv.unbind(1)  # (b, H, Dh)
    cap = st.k.shape[2]  # positions beyond it would be dropped by the scatter: the caller sizes it
    rows = torch.arange(b, device=x.device)
    st.k[rows, :, pos] = k.to(st.k.dtype)
    st.v[rows, :, pos] = v.to(st.v.dtype)
    st.length = pos + 1
    keys = torch.arange(cap, device=x.device)
    allowed = keys[None, :] <= pos[:, None]
    if a.window_size >= 0:
        allowed &= keys[None, :] >= (pos[:, None] - a.window_size)
    out = F.scaled_dot_product_attention(q.unsqueeze(2), st.k.to(q.dtype), st.v.to(q.dtype),
                                         attn_mask=allowed[:, None, None, :])  # (b, H, 1, Dh)
    return a.out_proj(out.reshape(b, a.d_model))


def block_state(block: Block, batch: int, capacity: int, device, dtype):
    if isinstance(block.mixer, Mamba2):
        return mamba_state(block.mixer, batch, device, dtype)
    return attn_state(block.mixer, batch, capacity, device, dtype)


def isotropic_step(net: Isotropic, hidden: torch.Tensor, states: list) -> torch.Tensor:
    """One position of an isotropic network for every row: (B, D) -> (B, D)."""
    residual = None
    for layer, st in zip(net.layers, states):
        residual = upcast(hidden) if residual is None else residual + upcast(hidden)
        normed = layer.norm1(residual).to(hidden.dtype)
        hidden = mamba_step(layer.mixer, normed, st) if isinstance(layer.mixer, Mamba2) \
            else attn_step(layer.mixer, normed, st)
        if layer.mlp is not None:
            residual = residual + upcast(hidden)
            hidden = layer.mlp(layer.norm2(residual).to(hidden.dtype))
    final = upcast(hidden) if residual is None else residual + upcast(hidden)
    return net.rmsnorm(final).to(hidden.dtype)


# ----------------------------------------------------------------------------- per-level state
@dataclass
class LevelState:
    """The cached state of one hierarchy level (and, through `inner`, of the levels inside it)."""

    encoder: list = field(default_factory=list)
    decoder: list = field(default_factory=list)
    main: list = field(default_factory=list)  # the innermost level's network
    prev_hidden: torch.Tensor | None = None  # (B, D): the routing module's previous position
    started: torch.Tensor | None = None  # (B,) bool: the row has had a position at this level
    ema: torch.Tensor | None = None  # (B, D): dechunk's smoothed inner output, fp32
    inner: "LevelState | None" = None


def level_state(level: HNet, batch: int, capacity: int, device, dtype) -> LevelState:
    def net(n: Isotropic) -> list:
        return [block_state(b, batch, capacity, device, dtype) for b in n.layers]

    if level.is_innermost:
        return LevelState(main=net(level.main_network))
    d = level.d_model
    return LevelState(encoder=net(level.encoder), decoder=net(level.decoder),
                      prev_hidden=torch.zeros(batch, d, device=device, dtype=dtype),
                      started=torch.zeros(batch, dtype=torch.bool, device=device),
                      ema=torch.zeros(batch, d, device=device, dtype=torch.float32),
                      inner=level_state(level.main_network, batch, capacity, device, dtype))


def level_step(level: HNet, hidden: torch.Tensor, st: LevelState, boundaries: list) -> torch.Tensor:
    """One position of `level` for every row of `hidden` (B, D_outer) -> (B, D_outer). Appends to
    `boundaries` this level's (mask, prob) and those of the levels inside, for these rows."""
    d_in = hidden.shape[-1]
    hidden = pad_to_level(level, hidden.unsqueeze(1)).squeeze(1)
    if level.is_innermost:
        return isotropic_step(level.main_network, hidden, st.main)[..., :d_in]
    h = isotropic_step(level.encoder, hidden, st.encoder)
    residual = level.residual_proj(h.to(level.residual_proj.weight.dtype))
    q = F.normalize(level.routing_module.q_proj_layer(st.prev_hidden), dim=-1)
    k = F.normalize(level.routing_module.k_proj_layer(h), dim=-1)
    p = torch.clamp((1 - (upcast(q) * upcast(k)).sum(-1)) / 2, min=0.0, max=1.0)
    p = torch.where(st.started, p, torch.ones_like(p))
    fired = p > 0.5
    st.prev_hidden, st.started = h, torch.ones_like(st.started)
    boundaries.append((fired, p))
    rows = fired.nonzero().squeeze(1)  # the one host sync of this level
    deeper: list = []
    if len(rows):
        sub = _select(st.inner, rows)
        z = level_step(level.main_network, h.index_select(0, rows), sub, deeper)
        _scatter(st.inner, rows, sub)
        pc = p.index_select(0, rows).clamp(min=1e-4, max=1 - 1e-4).unsqueeze(-1).to(torch.float32)
        st.ema.index_copy_(0, rows, pc * upcast(z) + (1 - pc) * st.ema.index_select(0, rows))
    b = hidden.shape[0]
    if not len(rows):  # no row went inward: the deeper levels have no boundary at this position
        deeper = [(torch.zeros(0, dtype=torch.bool, device=p.device), p.new_zeros(0))] * _routing_levels(level.main_network)
    for mask, prob in _expand_deeper(deeper, rows, b, hidden.device):
        boundaries.append((mask, prob))
    out = (st.ema + residual).to(h.dtype)  # the confidence STE is 1 in the forward pass
    return isotropic_step(level.decoder, out, st.decoder)[..., :d_in]


def _routing_levels(level: HNet) -> int:
    n = 0
    while not level.is_innermost:
        n, level = n + 1, level.main_network
    return n


def _expand_deeper(deeper: list, rows: torch.Tensor, b: int, device) -> list:
    """Deeper levels' (mask, prob) for the sub-batch `rows`, laid out over all b rows (False / 0
    where the inner level did not run)."""
    out = []
    for mask, prob in deeper:
        full_mask = torch.zeros(b, dtype=torch.bool, device=device)
        full_prob = torch.zeros(b, dtype=prob.dtype, device=device)
        full_mask[rows] = mask
        full_prob[rows] = prob
        out.append((full_mask, full_prob))
    return out


# ----------------------------------------------------------------------------- the model
class CachedDecoder:
    """Incremental decoding state of `model` for `batch` rows, each row one document from its
    start; `max_positions`: the most bytes a row will see (prompt and generated), which sizes the
    attention caches (an inner level never has more positions than the level around it)."""

    def __init__(self, model: HNetForCausalLM, batch: int, max_positions: int):
        p = next(model.parameters())
        self.model, self.batch, self.max_positions = model, batch, max_positions
        self.positions = 0
        self.state = level_state(model.backbone, batch, max_positions, p.device, p.dtype)

    @torch.no_grad()
    def step(self, byte_ids: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """byte_ids: (B,) -> next-byte logits (B, vocab) fp32, and per level (outer first) the
        boundary mask and probability at this position ((B,) each; False / 0 where a level did
        not run for a row because the level above it had no boundary)."""
        if self.positions >= self.max_positions:
            raise ValueError(f"CachedDecoder was sized for {self.max_positions} positions per row")
        self.positions += 1
        hidden = self.model.embeddings(byte_ids.long())
        boundaries: list = []
        hidden = level_step(self.model.backbone, hidden, self.state, boundaries)
        return upcast(self.model.lm_head(hidden)), boundaries
