"""Mamba-2's state-space duality (SSD) scan in pure PyTorch, chunked, with document resets.

Recurrence (per head h, state of shape (headdim, d_state)):
    state_t = exp(dt_t * A) * state_{t-1} + dt_t * x_t B_t^T
    y_t     = state_t C_t
and state_{t-1} is taken as zero where a new document starts (seq_idx changes).

The chunked form computes the quadratic "attention-like" product inside each chunk of
`chunk_size` positions and carries one state per chunk across chunks, which is what makes it
fast: O(L * chunk_size) work with large matmuls instead of L sequential steps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def ssd_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             chunk_size: int, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Chunked SSD scan.

    x: (b, l, h, p); dt: (b, l, h) positive step sizes (softplus already applied);
    A: (h,) negative decay rates; B, C: (b, l, g, n) with h % g == 0;
    seq_idx: (b, l) int, non-decreasing document index (None = one document per row).
    Returns y: (b, l, h, p) in x's dtype (computed in fp32 or better, also under autocast).
    """
    with torch.autocast(x.device.type, enabled=False):
        return _ssd_scan(x, dt, A, B, C, chunk_size, seq_idx)


def _ssd_scan(x, dt, A, B, C, chunk_size, seq_idx):
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    out_dtype = x.dtype
    ct = torch.promote_types(x.dtype, torch.float32)  # fp32 at least (float64 in gradient checks)
    if seq_idx is None:
        seq_idx = torch.zeros(b, l, dtype=torch.int32, device=x.device)
    Q = chunk_size
    pad = (-l) % Q
    if pad:
        # dt = 0 on padding: no decay and no input, so states pass through unchanged.
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
        seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(b, pad)], dim=1)
    nc = (l + pad) // Q
    r = h // g  # heads per group
    # Heads (and groups) first, then chunks: every product below is a contiguous batched matmul.
    xh = x.to(ct).view(b, nc, Q, h, p).permute(0, 3, 1, 2, 4)  # (b, h, c, Q, p)
    dth = dt.to(ct).view(b, nc, Q, h).permute(0, 3, 1, 2)  # (b, h, c, Q)
    Bg = B.to(ct).view(b, nc, Q, g, n).permute(0, 3, 1, 2, 4)  # (b, g, c, Q, n)
    Cg = C.to(ct).view(b, nc, Q, g, n).permute(0, 3, 1, 2, 4)
    seq = seq_idx.view(b, 1, nc, Q)

    dA_cum = torch.cumsum(dth * A.to(ct).view(1, h, 1, 1), dim=-1)  # (b, h, c, Q), non-increasing

    # 1) Inside each chunk: y_i = sum_{j <= i, same doc} (C_i . B_j) exp(cum_i - cum_j) dt_j x_j
    keep = (seq.unsqueeze(-1) == seq.unsqueeze(-2)) & torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    seg = dA_cum.unsqueeze(-1) - dA_cum.unsqueeze(-2)  # (b, h, c, Qi, Qj)
    decay = torch.exp(seg.masked_fill(~keep, float("-inf")))
    CB = Cg @ Bg.transpose(-1, -2)  # (b, g, c, Qi, Qj): once per group, shared by its heads
    scores = (decay.view(b, g, r, nc, Q, Q) * CB.unsqueeze(2)).view(b, h, nc, Q, Q)
    xdt = xh * dth.unsqueeze(-1)
    y = scores @ xdt  # (b, h, c, Q, p)

    # 2) State at each chunk end from the chunk's own inputs (those in the chunk's last document).
    last_seq = seq[..., -1]  # (b, 1, c)
    to_end = torch.exp(dA_cum[..., -1:] - dA_cum) * (seq == last_seq.unsqueeze(-1))  # (b, h, c, Q)
    Bh = Bg.unsqueeze(2).expand(b, g, r, nc, Q, n).reshape(b, h, nc, Q, n)
    chunk_states = (Bh * to_end.unsqueeze(-1)).transpose(-1, -2) @ xdt  # (b, h, c, n, p)

    # 3) Carry states across chunks; a chunk whose last document started inside it drops the carry.
    carry_ok = torch.ones_like(last_seq, dtype=torch.bool)
    carry_ok[..., 1:] = last_seq[..., 1:] == last_seq[..., :-1]
    chunk_decay = torch.exp(dA_cum[..., -1]) * carry_ok  # (b, h, c)
    state = xh.new_zeros(b, h, n, p)
    entering = []
    for c in range(nc):
        entering.append(state)
        state = state * chunk_decay[:, :, c, None, None] + chunk_states[:, :, c]
    prev = torch.stack(entering, dim=2)  # (b, h, c, n, p): state entering each chunk

    # 4) Contribution of the entering state, for positions still in the document it belongs to.
    prev_last = torch.cat([last_seq.new_full((b, 1, 1), -1), last_seq[..., :-1]], dim=-1)  # (b, 1, c)
    from_prev = torch.exp(dA_cum) * (seq == prev_last.unsqueeze(-1))  # (b, h, c, Q)
    Ch = Cg.unsqueeze(2).expand(b, g, r, nc, Q, n).reshape(b, h, nc, Q, n)
    y = y + (Ch @ prev) * from_prev.unsqueeze(-1)
    y = y.permute(0, 2, 3, 1, 4).reshape(b, nc * Q, h, p)
    return y[:, :l].to(out_dtype)


def ssd_reference(x, dt, A, B, C, seq_idx=None, dtype=torch.float64):
    """The same recurrence, one step at a time (slow; for tests and benchmarks)."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    rep = h // g
    x, dt, A, B, C = x.to(dtype), dt.to(dtype), A.to(dtype), B.to(dtype), C.to(dtype)
    Bh = B.repeat_interleave(rep, dim=2)
    Ch = C.repeat_interleave(rep, dim=2)
    state = x.new_zeros(b, h, p, n)
    ys = []
    for t in range(l):
        if seq_idx is not None and t > 0:
            reset = (seq_idx[:, t] != seq_idx[:, t - 1]).to(x.dtype)
            state = state * (1 - reset)[:, None, None, None]
        dA = torch.exp(dt[:, t] * A)  # (b, h)
        state = state * dA[:, :, None, None] + torch.einsum("bhp,bhn->bhpn", x[:, t] * dt[:, t, :, None], Bh[:, t])
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    return torch.stack(ys, dim=1)


def ema_scan(h: torch.Tensor, p: torch.Tensor, seq_idx: torch.Tensor | None, chunk_size: int = 256) -> torch.Tensor:
    """Exponential moving average zbar_t = p_t h_t + (1 - p_t) zbar_{t-1}, reset at document starts.

    h: (b, l, d); p: (b, l) in (0, 1). Written as an SSD scan with one head, d_state 1, A = -1 and
    dt = -log(1 - p), so the decay is exactly 1 - p and the input weight p.
    """
    ct = torch.promote_types(h.dtype, torch.float32)
    p = p.to(ct)
    dt = -torch.log1p(-p)  # (b, l)
    x = (h.to(ct) * (p / dt).unsqueeze(-1)).unsqueeze(2)  # (b, l, 1, d)
    ones = torch.ones(*p.shape, 1, 1, device=h.device, dtype=ct)
    A = -torch.ones(1, device=h.device, dtype=ct)
    y = ssd_scan(x, dt.unsqueeze(-1), A, ones, ones, chunk_size, seq_idx)
    return y.squeeze(2)


def ema_reference(h, p, seq_idx=None):
    b, l, d = h.shape
    out, z = [], h.new_zeros(b, d, dtype=torch.float64)
    for t in range(l):
        pt = p[:, t].double().unsqueeze(-1)
        if seq_idx is not None and t > 0:
            z = z * (seq_idx[:, t] == seq_idx[:, t - 1]).double().unsqueeze(-1)
        z = pt * h[:, t].double() + (1 - pt) * z
        out.append(z)
    return torch.stack(out, 1)
