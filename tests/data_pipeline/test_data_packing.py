"""Packing: labels are next bytes within a document, cu_seqlens are document boundaries."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipeline.batch import IGNORE_INDEX
from data_pipeline.packer import BOS, Piece, cut_piece, pack_row, split_piece


def test_pack_row_labels_and_cu_seqlens():
    mb = pack_row([Piece("s:a", b"abc"), Piece("s:b", b"\xff\x00")], capacity=16)
    a, b, c = ord("a"), ord("b"), ord("c")
    assert mb.input_ids.tolist() == [[BOS, a, b, c, BOS, 255, 0]]
    assert mb.labels.tolist() == [[a, b, c, IGNORE_INDEX, 255, 0, IGNORE_INDEX]]
    assert mb.cu_seqlens.tolist() == [0, 4, 7] and mb.cu_seqlens.dtype == torch.int32
    assert mb.input_ids.dtype == torch.uint8 and mb.labels.dtype == torch.int16 and mb.input_ids.shape == (1, 7)
    assert (mb.n_bytes, mb.n_targets, mb.capacity, mb.keys) == (7, 5, 16, ["s:a", "s:b"])


def test_round_to_pads_as_its_own_segment():
    mb = pack_row([Piece("s:a", b"hello")], capacity=16, round_to=8)
    assert mb.input_ids.shape == (1, 8)
    assert mb.cu_seqlens.tolist() == [0, 6, 8]
    assert mb.labels[0, 5:].tolist() == [IGNORE_INDEX] * 3
    assert (mb.n_bytes, mb.n_targets) == (6, 5)
    assert mb.packing_efficiency == 6 / 16
    empty = pack_row([], capacity=16, round_to=4)  # the dummy row a rank gets when data runs out
    assert empty.input_ids.shape == (1, 4) and empty.n_targets == 0 and empty.cu_seqlens.tolist() == [0, 4]
    with pytest.raises(ValueError):
        pack_row([Piece("s:a", b"x" * 20)], capacity=16)


@pytest.mark.parametrize("capacity", [2, 3, 7, 64])
def test_split_long_document_keeps_every_target(capacity):
    doc = np.random.default_rng(capacity).integers(0, 256, 200, dtype=np.uint8).tobytes()
    pieces = split_piece(Piece("s:k", doc), capacity)
    assert all(p.length <= capacity for p in pieces)
    assert pieces[0].bos and not any(p.bos for p in pieces[1:])  # continuations are no fresh start
    assert b"".join(p.data for p in pieces) == doc
    assert [p.key for p in pieces][:2] == ["s:k", f"s:k@{len(pieces[0].data)}"]
    # the targets over all pieces are exactly the document's next bytes, the last one ignored
    labels = []
    for p in pieces:
        mb = pack_row([p], capacity)
        labels += mb.labels[0].tolist()
    assert labels == list(doc) + [IGNORE_INDEX]
    assert sum(p.n_targets for p in pieces) == len(doc)


def test_split_restart_mode_and_cut():
    doc = bytes(range(50))
    parts = split_piece(Piece("s:k", doc), 16, restart_split_docs=True)
    assert all(p.bos and p.next_byte == -1 and p.length <= 16 for p in parts)
    assert b"".join(p.data for p in parts) == doc
    head, tail = cut_piece(Piece("s:k", doc), 10)
    assert head.length == 10 and head.next_byte == doc[9] and not tail.bos and tail.key == "s:k@9"
    h2, t2 = cut_piece(tail, 5)
    assert h2.key == "s:k@9" and t2.key == "s:k@14" and h2.data + t2.data == tail.data


def test_loader_batches_obey_the_contract(tmp_path):
    from dp_testutil import lognormal_docs, reassemble, write_shard_set

    from data_pipeline import BalancedStepLoader

    index, expected = write_shard_set(str(tmp_path), lognormal_docs(120, seed=1), docs_per_shard=30)
    loader = BalancedStepLoader([index], micro_batch_bytes=1024, step_bytes=4096, round_to=64, epochs=1)
    mbs = []
    for step in loader:
        assert len(step.micro_batches) == step.metrics["data/micro_batches"]
        assert step.global_targets == sum(m.n_targets for m in step.micro_batches)
        for mb in step.micro_batches:
            ids, lab, cu = mb.input_ids[0], mb.labels[0], mb.cu_seqlens.tolist()
            assert ids.shape[0] % 64 == 0 and ids.shape[0] <= 1024 and cu[-1] == ids.shape[0]
            assert int((lab != IGNORE_INDEX).sum()) == mb.n_targets
            assert len(cu) - 1 in (len(mb.keys), len(mb.keys) + 1)  # documents (+ one padding segment)
            for j in range(len(mb.keys)):  # inside a document, the label is the next input byte
                a, b = cu[j], cu[j + 1]
                assert torch.equal(lab[a:b - 1], ids[a + 1:b])
            assert (lab[cu[len(mb.keys)]:] == IGNORE_INDEX).all()  # padding has no targets
        mbs += step.micro_batches
    assert reassemble(mbs) == expected  # every document once, whole, in order
