"""FLOP estimates per byte and per document, for MFU and for the data pipeline's load balancing.

Counts multiply-adds as 2 FLOPs; training = 3 x forward (backward costs twice the forward).
A level s sees one position per prod_{i<s} N^i bytes, where N^i is the compression ratio of
routing level i (measured during training, or the targets before any is measured).
"""
from __future__ import annotations

import math

from .config import HNetConfig, parse_layout

TRAIN_FACTOR = 3.0


def attention_pairs(m: float, window: int | None) -> float:
    """(query, key) pairs of causal attention over m positions; with a window w a query sees
    at most w + 1 keys (itself and the w before it)."""
    if m <= 0:
        return 0.0
    if window is None or window < 0 or m <= window + 1:
        return m * (m + 1) / 2
    w1 = window + 1
    return w1 * (w1 + 1) / 2 + (m - w1) * w1


def _layers_of_level(config: HNetConfig, s: int) -> list[str]:
    layout = config.stage_layout(s)
    strings = [layout[0]] if len(layout) == 1 else [layout[0], layout[2]]
    return [letter for string in strings for letter, count in parse_layout(string) for _ in range(count)]


def _linear_flops_per_position(config: HNetConfig, s: int) -> tuple[float, int]:
    """Forward FLOPs per position at level s that do not depend on the document length, and the
    number of attention layers at that level."""
    D = config.d_model[s]
    ssm = config.ssm_cfg
    hidden = (config.d_intermediate[s] + 127) // 128 * 128
    total, n_attn = 0.0, 0
    for letter in _layers_of_level(config, s):
        if letter in "mM":
            di = ssm.expand * D
            nh = di // ssm.headdim
            gn = ssm.ngroups * ssm.d_state
            total += 2 * D * (2 * di + 2 * gn + nh) + 2 * di * D  # in_proj, out_proj
            total += 2 * (di + 2 * gn) * ssm.d_conv  # depthwise conv
            Q = ssm.chunk_size
            total += 2 * Q * (gn + di) + 4 * di * ssm.d_state  # SSD: in-chunk products, chunk states
        else:
            total += 2 * 4 * D * D  # Wqkv, out_proj
            n_attn += 1
        if letter in "MT":
            total += 2 * 3 * D * hidden  # fc1 (2 x hidden), fc2
    if s < config.num_stages:
        total += 2 * 3 * D * D  # routing q, k and residual_proj
    return total, n_attn


def document_cost_terms(config: HNetConfig, ratios: list[float] | None = None):
    """Training FLOPs of a document of n bytes, as
    linear_per_byte * n + sum(coef * attention_pairs(n / bytes_per_position, window)).

    Returns (linear_per_byte, [(coef, bytes_per_position, window or None), ...])."""
    ratios = list(config.ratio_targets if ratios is None else ratios)
    linear = 2 * config.vocab_size * config.d_model[0]  # lm_head
    terms = []
    bytes_per_position = 1.0
    for s in range(config.num_stages + 1):
        per_pos, n_attn = _linear_flops_per_position(config, s)
        linear += per_pos / bytes_per_position
        if n_attn:
            w = config.attn_cfg.window_size[s]
            terms.append((TRAIN_FACTOR * 4 * config.d_model[s] * n_attn, bytes_per_position, w if w >= 0 else None))
        if s < config.num_stages:
            bytes_per_position *= ratios[s]
    return TRAIN_FACTOR * linear, terms


def level_flops_per_byte(config: HNetConfig, ratios: list[float] | None = None, doc_bytes: int = 8192) -> list[float]:
    """Training FLOPs per byte of each hierarchy level (outer first) for documents of `doc_bytes`;
    the embeddings and the LM head count to level 0. They sum to `flops_per_byte`."""
    ratios = list(config.ratio_targets if ratios is None else ratios)
    out, bytes_per_position = [], 1.0
    for s in range(config.num_stages + 1):
        per_pos, n_attn = _linear_flops_per_position(config, s)
        f = per_pos / bytes_per_position + (2 * config.vocab_size * config.d_model[0] if s == 0 else 0.0)
        f *= TRAIN_FACTOR
        if n_attn:
            w = config.attn_cfg.window_size[s]
            coef = TRAIN_FACTOR * 4 * config.d_model[s] * n_attn
            f += coef * attention_pairs(doc_bytes / bytes_per_position, w if w >= 0 else None) / doc_bytes
        out.append(f)
        if s < config.num_stages:
            bytes_per_position *= ratios[s]
    return out


def document_flops(config: HNetConfig, n_bytes: float, ratios: list[float] | None = None) -> float:
    linear, terms = document_cost_terms(config, ratios)
    return linear * n_bytes + sum(c * attention_pairs(n_bytes / bpp, w) for c, bpp, w in terms)


def flops_per_byte(config: HNetConfig, ratios: list[float] | None = None, doc_bytes: int = 8192) -> float:
    """Training FLOPs per byte for documents of `doc_bytes` bytes (the paper's sequence length)."""
    return document_flops(config, doc_bytes, ratios) / doc_bytes


def num_parameters(config: HNetConfig) -> int:
    """Parameter count from the config alone (what a built model holds)."""
    ssm = config.ssm_cfg
    total = config.vocab_size * config.d_model[0] * (1 if config.tie_embeddings else 2)
    for s in range(config.num_stages + 1):
        D = config.d_model[s]
        hidden = (config.d_intermediate[s] + 127) // 128 * 128
        n_networks = 1 if s == config.num_stages else 2
        for letter in _layers_of_level(config, s):
            total += D  # norm1
            if letter in "mM":
                di = ssm.expand * D
                nh = di // ssm.headdim
                conv = di + 2 * ssm.ngroups * ssm.d_state
                total += D * (2 * di + 2 * ssm.ngroups * ssm.d_state + nh) + conv * ssm.d_conv + conv
                total += 3 * nh + di + di * D
            else:
                total += 4 * D * D
            if letter in "MT":
                total += D + 3 * D * hidden
        total += n_networks * D  # final rmsnorm of each network
        if s < config.num_stages:
            total += 2 * D * D + D * D + D  # routing q, k; residual_proj weight + bias
        if s > 0:
            total += D - config.d_model[s - 1]  # pad_dimension
    return total


def stage_compression(bytes_per_chunk: list[float]) -> list[float]:
    """Bytes per chunk at each stage (cumulative, outer first, as the trainer measures them) ->
    the compression ratio of each routing level alone, N^s = bpc^s / bpc^{s-1} (at least 1).
    The FLOP estimates here take per-level ratios; this is the one conversion (MFU, cost model)."""
    ratios, prev = [], 1.0
    for c in bytes_per_chunk:
        ratios.append(max(1.0, c / prev))
        prev = c if c > 0 else 1.0
    return ratios


class DocCostModel:
    """Estimated training FLOPs of one document of n bytes, for the data pipeline's balancer:

        cost(n) = linear_per_byte * n + sum_k coef_k * attention_pairs(n / bytes_per_position_k, window_k)

    The outer stages are linear in bytes; each attention stage is quadratic in the document's
    chunk count at that stage, estimated from the stage's compression (bytes per position),
    which the trainer updates from measured compression (`update_ratios`). Stateful: saved in the
    loader state, so a resumed run balances exactly as the uninterrupted one.
    """

    def __init__(self, linear_per_byte: float = 1.0,
                 attention_terms: list[tuple[float, float, int | None]] | None = None):
        self.linear_per_byte = float(linear_per_byte)
        self.attention_terms = [(float(c), float(b), None if w is None else int(w))
                                for c, b, w in (attention_terms or [])]

    def __call__(self, n_bytes: int) -> float:
        c = self.linear_per_byte * n_bytes
        for coef, bpp, window in self.attention_terms:
            c += coef * attention_pairs(n_bytes / bpp, window)
        return c

    def update_ratios(self, bytes_per_position: list[float]) -> None:
        """Measured compression (bytes per position at each attention term's stage), same order."""
        if len(bytes_per_position) != len(self.attention_terms):
            raise ValueError(f"got {len(bytes_per_position)} ratios for "
                             f"{len(self.attention_terms)} attention terms")
        self.attention_terms = [(c, max(float(b), 1e-6), w)
                                for (c, _, w), b in zip(self.attention_terms, bytes_per_position)]

    def update_from_compression(self, config: HNetConfig, bytes_per_chunk: list[float]) -> None:
        """Feeds measured bytes per chunk (cumulative, outer first) back into the estimate."""
        if not self.attention_terms or any(not math.isfinite(c) or c <= 0 for c in bytes_per_chunk):
            return
        _, terms = document_cost_terms(config, stage_compression(bytes_per_chunk))
        self.update_ratios([t[1] for t in terms])

    def state_dict(self) -> dict:
        return {"linear_per_byte": self.linear_per_byte,
                "attention_terms": [list(t) for t in self.attention_terms]}

    def load_state_dict(self, state: dict) -> None:
        self.__init__(state["linear_per_byte"], [tuple(t) for t in state["attention_terms"]])

    @classmethod
    def from_model_config(cls, config: HNetConfig, ratios: list[float] | None = None) -> "DocCostModel":
        """From the model's FLOP estimate (`document_cost_terms`), at the ratio targets by default."""
        return cls(*document_cost_terms(config, ratios))

    def __repr__(self) -> str:
        return f"DocCostModel({self.linear_per_byte}, {self.attention_terms})"
