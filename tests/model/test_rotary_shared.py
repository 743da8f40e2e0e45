"""The rotary table of a level is made once and shared by the level's attention layers (on a GPU
the H-Net step is bound by the host's dispatch of small operations; each layer made the same ten
again), with the same logits and gradients as a table made in every layer."""
import pytest
import torch

from pretrain.model import attention
from tests.model.conftest import tiny_model


def _attention_layers(model) -> int:
    return sum(isinstance(m, attention.CausalMHA) and m.rotary_emb_dim > 0 for m in model.modules())


@pytest.mark.parametrize("stages, levels_with_attention", [(1, 1), (2, 2)])
def test_one_rotary_table_per_level_and_forward(monkeypatch, stages, levels_with_attention):
    model = tiny_model(stages).train()
    assert _attention_layers(model) > levels_with_attention, "the test needs levels with several attention layers"
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (1, 96))
    cu = torch.tensor([0, 40, 41, 96], dtype=torch.int32)

    def loss_and_grads():
        model.zero_grad()
        out = model(ids, cu_seqlens=cu)
        out.logits.float().pow(2).mean().backward()
        return out.logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    made = []
    real = attention.rotary_cos_sin
    monkeypatch.setattr(attention, "rotary_cos_sin", lambda *a, **k: made.append(a[1]) or real(*a, **k))
    shared_logits, shared_grads = loss_and_grads()
    assert len(made) == levels_with_attention, f"{len(made)} tables made for {levels_with_attention} levels"

    # the same model with the table made in every layer (as before the sharing)
    monkeypatch.setattr(attention.PackedSeqs, "rotary", lambda self, dim, base: real(self.position_ids, dim, base))
    logits, grads = loss_and_grads()
    assert torch.equal(logits, shared_logits)
    assert all(torch.equal(a, b) for a, b in zip(grads, shared_grads))


@pytest.mark.parametrize("stages", [1, 2])
def test_activation_checkpointing_recomputes_with_the_shared_table(stages):
    """Checkpointed layers recompute their forward in the backward: the level's table, made in
    the first forward, serves the recomputation too, and the gradients are those without it."""
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (1, 96))
    cu = torch.tensor([0, 40, 41, 96], dtype=torch.int32)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(stages).train()
        model.set_activation_checkpointing(checkpointing)
        model(ids, cu_seqlens=cu).logits.float().pow(2).mean().backward()
        grads.append([p.grad for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) and all(torch.allclose(a, b, rtol=0, atol=1e-7)
                                                  for a, b in zip(*grads))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q_and_k_rotated_together_as_each_on_its_own(dtype):
    """CausalMHA rotates q and k with one set of operations on their (T, 2, H, Dh) view (half the
    launches): bit for bit what rotating each on its own gives, forward and gradients."""
    torch.manual_seed(0)
    T, H, Dh, r = 53, 4, 16, 8
    qkv = torch.randn(T, 3, H, Dh).to(dtype).requires_grad_()
    cos, sin = attention.rotary_cos_sin(torch.arange(T) % 20, r)
    together = attention.apply_rotary(qkv[:, :2], cos, sin)
    apart = torch.stack([attention.apply_rotary(qkv[:, i], cos, sin) for i in range(2)], dim=1)
    assert together.dtype == dtype and torch.equal(together, apart)
    g = torch.randn_like(together)
    (grad_together,) = torch.autograd.grad(together, qkv, g)
    (grad_apart,) = torch.autograd.grad(apart, qkv, g)
    assert torch.equal(grad_together, grad_apart)
