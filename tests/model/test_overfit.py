"""A tiny 1-stage H-Net memorises 2 KB of text on CPU while its compression approaches the target."""
import os
from pathlib import Path

import pytest
import torch

from pretrain.model import HNetConfig, HNetForCausalLM


@pytest.fixture
def cores():
    """This test is the only process running: it may use two threads (make test sets
    OMP_NUM_THREADS=1 for the multi-process tests, which run ranks side by side)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(before, min(2, os.cpu_count() or 1)))
    yield
    torch.set_num_threads(before)


def test_tiny_model_overfits_2kb_and_compression_moves_to_target(cores):
    torch.manual_seed(0)
    # 2 KB of English prose, frozen (the opening of an earlier README), so edits elsewhere do not change the data
    text = (Path(__file__).resolve().parents[1] / "fixtures" / "overfit_2kb.txt").read_bytes()
    assert len(text) == 2048
    ids = torch.tensor(list(text)).unsqueeze(0)
    labels = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], dim=1)
    target = 3.0
    config = HNetConfig.from_dict(dict(
        arch_layout=["m1", ["T2"], "m1"], d_model=[64, 96], d_intermediate=[0, 192],
        ssm_cfg=dict(d_state=16, headdim=16, chunk_size=64),
        attn_cfg=dict(num_heads=[4, 4], rotary_emb_dim=[8, 12], window_size=[63, -1]),
        ratio_targets=[target], ratio_alpha=0.03))
    model = HNetForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    first_ratio = None
    for step in range(130):
        out = model(ids, labels=labels)
        if first_ratio is None:
            first_ratio, first_loss = out.stages[0].compression_ratio.item(), out.loss.item()
        opt.zero_grad()
        (out.loss + out.ratio_loss).backward()
        opt.step()
    with torch.no_grad():
        out = model(ids, labels=labels)
    ratio = out.stages[0].compression_ratio.item()
    print(f"loss {first_loss:.3f} -> {out.loss.item():.3f} nats/byte; compression {first_ratio:.2f} -> {ratio:.2f} "
          f"(target {target})")
    assert out.loss.item() < 0.5
    assert abs(ratio - target) < 0.5 * abs(first_ratio - target)
