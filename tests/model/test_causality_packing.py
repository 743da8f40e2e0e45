"""Causality through routing and chunking, and exact document isolation in packed rows."""
import pytest
import torch

from tests.model.conftest import tiny_model


@pytest.mark.parametrize("stages", [1, 2])
def test_future_bytes_never_change_past_logits(stages):
    model = tiny_model(stages, dtype=torch.float64)
    torch.manual_seed(1)
    L = 80
    ids = torch.randint(0, 256, (1, L))
    with torch.no_grad():
        base = model(ids).logits
        boundaries = model(ids).stages[0].boundary_mask
    assert 0 < int(boundaries.sum()) < L, "routing should make some but not all positions boundaries"
    for t in (0, 5, 17, 40, 63, 78):
        changed = ids.clone()
        changed[0, t + 1:] = torch.randint(0, 256, (L - t - 1,))
        with torch.no_grad():
            logits = model(changed).logits
        assert torch.equal(logits[0, :t + 1], base[0, :t + 1]), f"logits at or before {t} changed"
        if t + 1 < L:
            assert not torch.allclose(logits[0, t + 1:], base[0, t + 1:])


@pytest.mark.parametrize("stages", [1, 2])
def test_packed_documents_equal_documents_alone(stages):
    model = tiny_model(stages)
    torch.manual_seed(2)
    lengths = [37, 1, 64, 5, 90, 23]  # crosses SSD chunk boundaries, includes a 1-byte document
    docs = [torch.randint(0, 256, (1, n)) for n in lengths]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    with torch.no_grad():
        packed = model(torch.cat(docs, dim=1), cu_seqlens=cu)
        for i, doc in enumerate(docs):
            alone = model(doc)
            got = packed.logits[0, cu[i]:cu[i + 1]]
            assert torch.allclose(got, alone.logits[0], atol=1e-5, rtol=0), \
                f"document {i}: max diff {(got - alone.logits[0]).abs().max():.2e}"
            # the routing decisions of the document are the same too
            assert torch.equal(packed.stages[0].boundary_mask[cu[i]:cu[i + 1]], alone.stages[0].boundary_mask)


def test_batch_rows_are_independent_documents():
    """(B, L) without cu_seqlens runs every row as its own document."""
    model = tiny_model(1)
    ids = torch.randint(0, 256, (3, 40))
    with torch.no_grad():
        batched = model(ids).logits
        for b in range(3):
            assert torch.allclose(batched[b], model(ids[b:b + 1]).logits[0], atol=1e-5, rtol=0)


def test_document_start_is_always_a_boundary():
    model = tiny_model(2)
    ids = torch.randint(0, 256, (1, 60))
    cu = torch.tensor([0, 10, 11, 35, 60], dtype=torch.int32)
    with torch.no_grad():
        out = model(ids, cu_seqlens=cu)
    p = out.stages[0].boundary_prob
    assert torch.all(p[cu[:-1].long()] == 1) and torch.all(out.stages[0].boundary_mask[cu[:-1].long()])


def test_attention_spans_split_only_at_document_boundaries():
    from pretrain.model.attention import document_groups

    assert document_groups([0, 3, 5, 9], 100) == [(0, 9)]
    assert document_groups([0, 3, 5, 9], 5) == [(0, 5), (5, 9)]
    assert document_groups([0, 10, 12], 4) == [(0, 10), (10, 12)]  # a long document stays whole
    spans = document_groups([0, 1, 2, 3, 4, 5, 6, 7], 3)
    assert spans[0][0] == 0 and spans[-1][1] == 7 and all(b - a <= 3 for a, b in spans)
    assert all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))


def test_span_split_attention_equals_one_mask():
    from pretrain.model.attention import packed_causal_mask, sdpa_packed
    from pretrain.model.sequence import PackedSeqs

    torch.manual_seed(0)
    seqs = PackedSeqs.from_cu_seqlens(torch.tensor([0, 5, 6, 20, 33, 40], dtype=torch.int32))
    q, k, v = (torch.randn(40, 2, 8) for _ in range(3))
    for window in (-1, 3):
        whole = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
            attn_mask=packed_causal_mask(seqs, window)).transpose(0, 1)
        assert torch.allclose(sdpa_packed(q, k, v, seqs, window, max_span=8), whole, atol=1e-6)


@pytest.mark.parametrize("stages", [1, 2])
def test_routing_statistics_ignore_trailing_padding(stages):
    """A padding segment at the row's end (row rounding, idle ranks) is left out of F, G, the
    ratio loss and the compression ratio when n_real is given."""
    model = tiny_model(stages)
    torch.manual_seed(3)
    real = torch.randint(0, 256, (1, 70))
    cu = torch.tensor([0, 30, 70], dtype=torch.int32)
    padded = torch.cat([real, torch.zeros(1, 26, dtype=torch.long)], dim=1)
    cu_padded = torch.tensor([0, 30, 70, 96], dtype=torch.int32)
    with torch.no_grad():
        want = model(real, cu_seqlens=cu)
        got = model(padded, cu_seqlens=cu_padded, n_real=70)
        naive = model(padded, cu_seqlens=cu_padded)
        empty = model(torch.zeros(1, 16, dtype=torch.long), cu_seqlens=torch.tensor([0, 16], dtype=torch.int32),
                      n_real=0)
    for a, b in zip(got.stages, want.stages):
        for field in ("F", "G", "compression_ratio", "ratio_loss"):
            assert torch.allclose(getattr(a, field), getattr(b, field), atol=1e-6), field
    assert not torch.allclose(naive.stages[0].G, want.stages[0].G)
    assert float(empty.ratio_loss) == 0.0
