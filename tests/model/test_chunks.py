"""Boundary quality metrics and the boundary picture (pretrain/chunks.py) on hand-made inputs."""
from __future__ import annotations

import math
import re

import torch

from pretrain.chunks import BoundarySums, boundary_html, byte_level_boundaries

TEXT = b"ab cd.ef"  # after BOS: positions 1..8


def test_metrics_equal_hand_computed_values():
    ids = torch.tensor([254, *TEXT]).view(1, -1)
    labels = torch.tensor([*TEXT, -100]).view(1, -1)
    cu = torch.tensor([0, 9], dtype=torch.int32)
    # logits: the target byte gets logit v_t, every other byte 0, so CE_t = log(e^v + 255) - v
    v = [0.5, 1.0, 2.0, -1.0, 0.0, 3.0, 1.5, 0.25, 0.0]
    logits = torch.zeros(9, 256)
    for t in range(8):
        logits[t, TEXT[t]] = v[t]
    ce = [math.log(math.exp(v[t]) + 255) - v[t] for t in range(8)]
    mask0 = torch.tensor([1, 0, 0, 0, 1, 0, 0, 1, 0], dtype=torch.bool)  # chunks start at 'c' and 'e'
    mask1 = torch.tensor([1, 0, 1], dtype=torch.bool)  # stage 1 keeps the chunks at positions 0 and 7
    sums = BoundarySums(2)
    sums.add(ids, cu, logits, labels, [mask0, mask1], [mask0.float() * 0.9, mask1.float() * 0.8])
    m = sums.metrics()
    # stage 0: boundaries at 4 (after ' ') and 7 (after '.'): both after a separator; of the 8
    # counted positions (1..8) two follow a separator
    assert m["eval/boundary_after_space/stage0"] == 1.0
    assert m["eval/boundary_after_space_all/stage0"] == 2 / 8
    # surprisal of byte t is CE_{t-1}: at the boundaries CE_3 and CE_6, over all bytes CE_0..CE_7
    expect0 = ((ce[3] + ce[6]) / 2) / (sum(ce) / 8)
    assert abs(m["eval/boundary_enrichment/stage0"] - expect0) < 1e-5
    # stage 1: only position 7 (the document start is not counted)
    assert m["eval/boundary_after_space/stage1"] == 1.0
    assert abs(m["eval/boundary_enrichment/stage1"] - ce[6] / (sum(ce) / 8)) < 1e-5
    # additive: the sums of two rows reduce like one row twice
    twice = BoundarySums(2).from_vector([2 * x for x in sums.vector()])
    assert twice.metrics() == m


def test_byte_level_boundaries_map_inner_levels_to_bytes():
    mask0 = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    mask1 = torch.tensor([1, 0, 0, 1], dtype=torch.bool)  # over the 4 kept positions 0, 2, 3, 5
    (b0, _), (b1, p1) = byte_level_boundaries([mask0, mask1], [mask0.float(), torch.tensor([1.0, 0.2, 0.3, 0.9])])
    assert b0.nonzero().flatten().tolist() == [0, 2, 3, 5]
    assert b1.nonzero().flatten().tolist() == [0, 5]
    assert torch.allclose(p1, torch.tensor([1.0, 0.0, 0.2, 0.3, 0.0, 0.9]))


def test_picture_marks_exactly_the_boundaries():
    data = b"hello world, hi"
    b0 = [i in (0, 6, 11, 13) for i in range(len(data))]
    b1 = [i in (0, 11) for i in range(len(data))]
    page = boundary_html(data, [(b0, [0.9 if x else 0.1 for x in b0]), (b1, [0.8 if x else 0.0 for x in b1])],
                         "test", [2.5, 7.5])
    rows = re.findall(r"<div class='row' data-stage='(\d)'>(.*?)</div>", page)
    assert [s for s, _ in rows] == ["0", "1"]
    for s, body in rows:
        flags = re.findall(rf"data-b{s}='(\d)'", body)
        assert len(flags) == len(data)
        assert [i for i, f in enumerate(flags) if f == "1"] == [i for i, x in enumerate((b0, b1)[int(s)]) if x]
    assert "stage 1: 7.50 bytes per chunk" in page and "<script" not in page
