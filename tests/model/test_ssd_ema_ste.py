"""The chunked SSD scan and EMA against naive loops; gradients through dechunking and the STE."""
import pytest
import torch

from pretrain.model import ratio_loss, ste
from pretrain.model.dynamic_chunking import RoutingModule, chunk, dechunk
from pretrain.model.sequence import PackedSeqs
from pretrain.model.ssd import ema_reference, ema_scan, ssd_reference, ssd_scan


def seq_idx_from(lengths):
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).unsqueeze(0).int()


@pytest.mark.parametrize("chunk_size", [8, 16, 64])
@pytest.mark.parametrize("groups", [1, 2])
def test_ssd_scan_matches_recurrence(chunk_size, groups):
    torch.manual_seed(0)
    b, h, p, n = 2, 4, 3, 5
    lengths = [7, 1, 20, 9]  # 37 positions: not a multiple of any chunk size
    l = sum(lengths)
    x = torch.randn(b, l, h, p, dtype=torch.float64)
    dt = torch.rand(b, l, h, dtype=torch.float64) * 0.5 + 0.01
    A = -torch.rand(h, dtype=torch.float64) * 2 - 0.1
    B = torch.randn(b, l, groups, n, dtype=torch.float64)
    C = torch.randn(b, l, groups, n, dtype=torch.float64)
    seq = seq_idx_from(lengths).expand(b, -1)
    got = ssd_scan(x, dt, A, B, C, chunk_size, seq)
    want = ssd_reference(x, dt, A, B, C, seq)
    assert torch.allclose(got.double(), want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    # without resets it is one long recurrence
    assert torch.allclose(ssd_scan(x, dt, A, B, C, chunk_size).double(), ssd_reference(x, dt, A, B, C), atol=1e-5)


def test_ema_matches_loop():
    torch.manual_seed(0)
    lengths = [5, 30, 1, 12]
    h = torch.randn(1, sum(lengths), 6, dtype=torch.float64)
    p = torch.rand(1, sum(lengths), dtype=torch.float64).clamp(1e-4, 1 - 1e-4)
    seq = seq_idx_from(lengths)
    assert torch.allclose(ema_scan(h, p, seq, chunk_size=8).double(), ema_reference(h, p, seq), atol=1e-6)


def test_ste_forward_is_one_backward_is_identity():
    c = torch.rand(10, dtype=torch.float64, requires_grad=True)
    out = torch.randn(10, 4, dtype=torch.float64)
    y = out * ste(c).unsqueeze(-1)
    assert torch.equal(y, out)  # forward: multiply by exactly 1
    g = torch.randn(10, 4, dtype=torch.float64)
    (grad,) = torch.autograd.grad(y, c, g)
    assert torch.allclose(grad, (g * out).sum(-1))  # backward: d/dc as if ste(c) were c


def test_gradcheck_routing_chunk_dechunk_float64():
    """gradcheck (float64) of everything around the STE: routing probabilities, chunking and
    the EMA dechunk, as functions of the encoder output and of the inner network's output."""
    torch.manual_seed(0)
    D, lengths = 4, [6, 9]
    seqs = PackedSeqs.from_cu_seqlens(torch.tensor([0, 6, 15], dtype=torch.int32))
    routing = RoutingModule(D).double()
    with torch.no_grad():
        routing.q_proj_layer.weight.add_(0.5 * torch.randn(D, D, dtype=torch.float64))
    hidden = torch.randn(1, sum(lengths), D, dtype=torch.float64, requires_grad=True)
    r = routing(hidden, seqs)

    def f(h):
        out = routing(h, seqs)
        return out.boundary_prob, out.selected_probs

    assert torch.autograd.gradcheck(f, (hidden,), eps=1e-6, atol=1e-5)
    inner, inner_seqs = chunk(hidden, r, seqs)
    inner = inner.detach().requires_grad_(True)
    probs = r.boundary_prob.detach().clone().requires_grad_(True)

    def g(z, p):
        r2 = type(r)(boundary_prob=p, boundary_mask=r.boundary_mask, selected_probs=r.selected_probs)
        return dechunk(z, r2, inner_seqs).double()

    assert torch.autograd.gradcheck(g, (inner, probs), eps=1e-6, atol=1e-5)


def test_gradients_reach_routing_through_ste_in_full_model():
    from tests.model.conftest import tiny_model

    model = tiny_model(1, dtype=torch.float64).train()
    ids = torch.randint(0, 256, (1, 50))
    out = model(ids, labels=ids)
    out.loss.backward()
    q = model.backbone.routing_module.q_proj_layer.weight
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert model.backbone.residual_proj.weight.grad.abs().sum() > 0


def test_ratio_loss_equation_10():
    for N in (2.0, 3.0, 6.0):
        for F_, G in ((0.1, 0.2), (0.5, 0.5), (0.9, 0.05)):
            want = N / (N - 1) * ((N - 1) * F_ * G + (1 - F_) * (1 - G))
            assert abs(float(ratio_loss(torch.tensor(F_), torch.tensor(G), N)) - want) < 1e-6
        grid = torch.linspace(0.01, 0.99, 981, dtype=torch.float64)
        values = ratio_loss(grid, grid, N)
        best = grid[values.argmin()]
        assert abs(float(best) - 1 / N) < 2e-3
        assert abs(float(values.min()) - 1.0) < 1e-5


def test_skip_path_and_scan_stay_fp32_under_bf16_autocast():
    from tests.model.conftest import tiny_model

    model = tiny_model(1)
    seen = {}
    model.backbone.residual_proj.register_forward_hook(lambda m, i, o: seen.update(residual=o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randint(0, 256, (1, 40)))
        y = ssd_scan(torch.randn(1, 20, 2, 4), torch.rand(1, 20, 2), -torch.rand(2), torch.randn(1, 20, 1, 3),
                     torch.randn(1, 20, 1, 3), 8)
    assert seen["residual"] == torch.float32
    assert y.dtype == torch.float32
    assert torch.isfinite(out.logits).all()
