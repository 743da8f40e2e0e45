"""What the model learned to chunk: boundary quality metrics and the boundary picture.

Boundaries of every stage are mapped to byte positions: a byte starts a stage-s chunk when the
routing of every level up to s fired there (level s routes the positions level s-1 kept).

Metrics, per stage s, over real positions that are not a document start (those are boundaries
by construction):
- boundary_after_space: the share of boundaries whose previous byte is whitespace or ASCII
  punctuation, beside `boundary_after_space_all`, that share over all positions (a chunker that
  ignored spaces would have the two equal);
- boundary_enrichment: mean next-byte surprisal (-log p of the byte, from the position before)
  at boundary positions over the mean at all positions: above 1 when chunks start where the
  model finds the next byte hard to predict, as the paper's Figure 5 observes.
`BoundarySums` holds additive sums so evaluation reduces them over micro-batches and ranks.

The picture is one HTML file: the passage once per stage, each chunk on a tinted background
that alternates between chunks, a chunk's start coloured by its boundary probability, and each
byte's span carrying `data-b{s}` = 1 where stage s has a boundary (what the tests read).
"""
from __future__ import annotations

import html
import string

import torch
import torch.nn.functional as F

SEPARATORS = frozenset((string.whitespace + string.punctuation).encode())
_SEPARATOR_TABLE = torch.tensor([b in SEPARATORS for b in range(256)])  # byte -> is whitespace/punctuation
STAGE_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]


def byte_level_boundaries(masks: list[torch.Tensor], probs: list[torch.Tensor]) -> list[tuple[torch.Tensor,
                                                                                              torch.Tensor]]:
    """Per stage (outer first) the boundary mask and probability at byte positions. masks[s],
    probs[s]: over the positions of level s (len(masks[0]) = bytes). The probability of stage
    s > 0 is set at the bytes that level s saw (the stage s-1 boundaries), 0 elsewhere."""
    n = masks[0].numel()
    index = torch.arange(n, device=masks[0].device)
    out = []
    for mask, prob in zip(masks, probs):
        m = mask.bool()[: index.numel()]
        byte_mask = torch.zeros(n, dtype=torch.bool, device=index.device)
        byte_prob = torch.zeros(n, dtype=torch.float32, device=index.device)
        byte_mask[index[: m.numel()][m]] = True
        byte_prob[index[: m.numel()]] = prob[: m.numel()].float()
        out.append((byte_mask, byte_prob))
        index = index[: m.numel()][m]
    return out


def surprisal(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(T,) -log p(byte t | bytes < t), NaN where there is none (a document's first byte).
    logits (T, V) and labels (T,) of one packed row; labels[t] is byte t+1 or -100."""
    labels = labels.reshape(-1).long()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.clamp(min=0), reduction="none")
    ce = torch.where(labels >= 0, ce, torch.full_like(ce, float("nan")))
    return torch.cat([ce.new_full((1,), float("nan")), ce[:-1]])


class BoundarySums:
    """Per stage, additive sums over rows (see the module docstring); `vector` / `from_vector`
    flatten them for one all-reduce."""

    FIELDS = ("boundaries", "after_sep", "positions", "positions_after_sep", "surprisal_at_boundaries",
              "n_surprisal_at_boundaries", "surprisal_all", "n_surprisal_all")

    def __init__(self, n_stages: int):
        self.n_stages = n_stages
        for name in self.FIELDS:
            setattr(self, name, [0.0] * n_stages)

    def add(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
            masks: list[torch.Tensor], probs: list[torch.Tensor]) -> None:
        """One packed row: its bytes, documents, logits, labels and every stage's routing. The
        row's bytes, documents and labels may be the host's (the loader's micro-batch) and the
        model's outputs a GPU's: the sums are taken on the outputs' device and read once."""
        dev = logits.device
        n = masks[0].numel()  # real positions (padding at the row's end is not routed here)
        ids = input_ids.reshape(-1)[:n].long().to(dev)
        starts = torch.zeros(n, dtype=torch.bool, device=dev)
        cu = cu_seqlens.long().to(dev)
        starts[cu[:-1][cu[:-1] < n]] = True
        counted = ~starts
        prev = torch.cat([ids.new_zeros(1), ids[:-1]])
        sep = _SEPARATOR_TABLE.to(dev)[prev] & counted
        s = surprisal(logits.reshape(-1, logits.shape[-1])[:n], labels.reshape(-1)[:n].to(dev))
        has_s = ~torch.isnan(s) & counted
        sums = []  # per stage, in the order of FIELDS
        for bm, _ in byte_level_boundaries(masks, probs):
            b = bm & counted
            sums.append(torch.stack([t.double() for t in (
                b.sum(), (b & sep).sum(), counted.sum(), sep.sum(), torch.where(b & has_s, s, 0.0).sum(),
                (b & has_s).sum(), torch.where(has_s, s, 0.0).sum(), has_s.sum())]))
        for k, values in enumerate(torch.stack(sums).tolist()):
            for name, v in zip(self.FIELDS, values):
                getattr(self, name)[k] += v

    def vector(self) -> list[float]:
        return [v for name in self.FIELDS for v in getattr(self, name)]

    def from_vector(self, vec: list[float]) -> "BoundarySums":
        for i, name in enumerate(self.FIELDS):
            setattr(self, name, list(vec[i * self.n_stages:(i + 1) * self.n_stages]))
        return self

    def metrics(self, prefix: str = "eval") -> dict[str, float]:
        out = {}
        for k in range(self.n_stages):
            if self.boundaries[k]:
                out[f"{prefix}/boundary_after_space/stage{k}"] = self.after_sep[k] / self.boundaries[k]
            if self.positions[k]:
                out[f"{prefix}/boundary_after_space_all/stage{k}"] = self.positions_after_sep[k] / self.positions[k]
            if self.n_surprisal_at_boundaries[k] and self.n_surprisal_all[k] and self.surprisal_all[k]:
                at_b = self.surprisal_at_boundaries[k] / self.n_surprisal_at_boundaries[k]
                out[f"{prefix}/boundary_enrichment/stage{k}"] = at_b / (self.surprisal_all[k] / self.n_surprisal_all[k])
        return out


# ----------------------------------------------------------------------------- the picture
def _byte_text(b: int) -> str:
    if b == 10:
        return "\u21b5"  # a visible newline
    if 32 <= b < 127:
        return html.escape(chr(b))
    return f"<small>\\x{b:02x}</small>"


def boundary_html(data: bytes, boundaries: list, title: str = "", compression: list[float] | None = None) -> str:
    """One self-contained HTML page: `data` drawn once per stage with its chunks. boundaries: per
    stage (mask, prob) at byte positions (lists or tensors of len(data))."""
    return boundary_page([(title or "Chunk boundaries", data, boundaries, compression)])


def boundary_page(passages: list[tuple[str, bytes, list, list[float] | None]]) -> str:
    """Several passages (title, bytes, per-stage (mask, prob), bytes per chunk or None) on one page."""
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>H-Net chunks</title><style>"
             "body{font-family:sans-serif;margin:1.5em}.row{font-family:monospace;font-size:15px;line-height:2;"
             "white-space:pre-wrap;word-break:break-all;margin-bottom:1em}.row span{padding:1px 0}"
             "</style></head><body>"]
    for title, data, boundaries, compression in passages:
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if compression:
            parts.append("<p>" + ", ".join(f"stage {s}: {c:.2f} bytes per chunk" for s, c in enumerate(compression))
                         + "</p>")
        parts += _passage_rows(data, boundaries)
    parts.append("</body></html>")
    return "".join(parts)


def _passage_rows(data: bytes, boundaries: list) -> list[str]:
    masks = [[bool(m) for m in mask] for mask, _ in boundaries]
    parts = []
    for s, (_, prob) in enumerate(boundaries):
        prob = [float(p) for p in prob]
        colour = STAGE_COLOURS[s % len(STAGE_COLOURS)]
        parts.append(f"<h3 style='color:{colour}'>stage {s}: {sum(masks[s])} chunks over {len(data)} bytes</h3>"
                     f"<div class='row' data-stage='{s}'>")
        chunk = -1
        for i, b in enumerate(data):
            if masks[s][i]:
                chunk += 1
            style = f"background:{'#eef3fb' if chunk % 2 == 0 else '#fdf1e6'}"
            if masks[s][i]:
                alpha = max(0.15, min(1.0, prob[i]))
                style += f";border-left:3px solid {colour};box-shadow:inset 0 -3px 0 rgba(0,0,0,{alpha:.2f})"
            flags = " ".join(f"data-b{k}='{int(masks[k][i])}'" for k in range(len(masks)))
            parts.append(f"<span {flags} title='p={prob[i]:.3f}' style='{style}'>{_byte_text(b)}</span>")
        parts.append("</div>")
    return parts
