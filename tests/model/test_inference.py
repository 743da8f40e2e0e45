"""Cached incremental decoding (pretrain/model/inference.py, pretrain/sample.py) against the
packed forward: logits per position, greedy decoding against recomputing the whole prefix each
step, and a batch against its rows run alone. Attention in the main network has a sliding window
shorter than the prompts, so the cache's window is exercised."""
from __future__ import annotations

import pytest
import torch

from pretrain.model import HNetConfig, HNetForCausalLM
from pretrain.model.inference import CachedDecoder
from pretrain.sample import generate, generate_recompute

SSM = dict(d_state=16, d_conv=4, expand=2, chunk_size=64, headdim=16)
CONFIGS = {
    "1-stage": dict(arch_layout=["m1", ["T1"], "m1"], d_model=[32, 48], d_intermediate=[0, 96], vocab_size=256,
                    ssm_cfg=SSM, attn_cfg=dict(num_heads=[2, 2], rotary_emb_dim=[8, 8], window_size=[63, 5]),
                    ratio_targets=[4.0]),
    "2-stage": dict(arch_layout=["m1", ["T1", ["T1m1"], "m1"], "m1"], d_model=[32, 40, 48],
                    d_intermediate=[0, 80, 96], vocab_size=256, ssm_cfg=SSM,
                    attn_cfg=dict(num_heads=[2, 2, 2], rotary_emb_dim=[8, 8, 8], window_size=[63, 7, 3]),
                    ratio_targets=[2.0, 2.0]),
}
PROMPT_LENGTHS = [21, 34, 9]


def model_of(name: str) -> HNetForCausalLM:
    torch.manual_seed(0)
    return HNetForCausalLM(HNetConfig.from_dict(CONFIGS[name])).eval()


def prompts() -> list[bytes]:
    g = torch.Generator().manual_seed(7)
    return [bytes(torch.randint(0, 250, (n,), generator=g).tolist()) for n in PROMPT_LENGTHS]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_logits_equal_the_packed_forward_at_every_position(name):
    model = model_of(name)
    rows = [torch.tensor([254, *p]) for p in prompts()]
    n = max(len(r) for r in rows)
    dec = CachedDecoder(model, len(rows), n)
    stepped = []
    for t in range(n):
        x = torch.stack([r[t] if t < len(r) else torch.tensor(0) for r in rows])
        logits, _ = dec.step(x)
        stepped.append(logits)
    stepped = torch.stack(stepped, 1)  # (B, n, V)
    for i, r in enumerate(rows):
        with torch.no_grad():
            full = model(r.view(1, -1)).logits[0]
        diff = (stepped[i, :len(r)] - full).abs().max().item()
        assert diff < 1e-4, f"{name}: row {i} differs from the packed forward by {diff}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_with_caches_equals_recomputing_the_prefix(name):
    model = model_of(name)
    gens, stats = generate(model, prompts(), max_bytes=24, temperature=0.0, eos=None)
    ref = generate_recompute(model, prompts(), max_bytes=24)
    assert [bytes(g.output) for g in gens] == ref
    assert all(g.stop_reason == "max_bytes" for g in gens)
    # the inner levels really were skipped on some steps (the point of the cache per level)
    assert all(0 < f < 1 for f in stats["inner_level_ran_fraction"].values()), stats


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_batch_equals_its_rows_alone(name):
    model = model_of(name)
    together, _ = generate(model, prompts(), max_bytes=16, temperature=0.0, eos=None)
    for p, g in zip(prompts(), together):
        (alone,), _ = generate(model, [p], max_bytes=16, temperature=0.0, eos=None)
        assert bytes(alone.output) == bytes(g.output)
        for (ma, pa), (mb, pb) in zip(alone.boundaries, g.boundaries):
            assert ma == mb
            assert max(abs(x - y) for x, y in zip(pa, pb)) < 1e-5


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = model_of("1-stage")
    a, _ = generate(model, prompts(), max_bytes=12, temperature=0.9, top_p=0.9, seed=3, eos=None)
    b, _ = generate(model, prompts(), max_bytes=12, temperature=0.9, top_p=0.9, seed=3, eos=None)
    assert [bytes(g.output) for g in a] == [bytes(g.output) for g in b]
    k1, _ = generate(model, prompts(), max_bytes=12, temperature=0.7, top_k=1, seed=5, eos=None)
    greedy, _ = generate(model, prompts(), max_bytes=12, temperature=0.0, eos=None)
    assert [bytes(g.output) for g in k1] == [bytes(g.output) for g in greedy]


def test_stop_strings_and_byte_budget():
    model = model_of("1-stage")
    (free,), _ = generate(model, [b"abc"], max_bytes=20, temperature=0.0, eos=None)
    stop = bytes(free.output[3:5])
    (stopped,), _ = generate(model, [b"abc"], max_bytes=20, temperature=0.0, eos=None, stops=[stop])
    assert stopped.stop_reason == "stop" and bytes(stopped.output).endswith(stop)
    assert len(stopped.output) <= 5 + len(stop)
    assert len(stopped.boundaries[0][0]) == 3 + len(stopped.output)
