"""The noisy FeatureGate as one autograd op (dcopt.gates._NoisyGate) computes the same
values and gradients as the plain formulation it replaced (mask, scale, index_add)."""
import pytest
import torch

from dcopt.gates import LAMBDA_EPS, FeatureGate


def reference(gate, x, kappas):
    """The gate's noisy forward as it was written before the fused op (all autograd)."""
    widths = torch.tensor(gate.widths, dtype=x.dtype)
    s = torch.stack([k.to(x.dtype).reshape(()) for k in kappas]) * widths
    m = torch.minimum(torch.floor(s.detach()), widths - 1)
    frac = s - m
    frac = frac + (frac.detach().clamp(0.0, 1.0) - frac.detach())
    lam = LAMBDA_EPS + (1 - 2 * LAMBDA_EPS) * frac
    m_pos = gate._per_position(m.long(), 1 << 62)
    fixed = gate.group < 0
    clean = fixed | (gate.ch < m_pos)
    boundary = ~fixed & (gate.ch == m_pos)
    lam_pos = gate._per_position(lam, 1.0)
    scale = torch.where(boundary, lam_pos.sqrt(), torch.ones_like(lam_pos))
    out = torch.where(gate._view(clean | boundary, x), x * gate._view(scale, x), x.new_zeros(()))
    b_idx = torch.nonzero(boundary, as_tuple=False).flatten()
    if b_idx.numel() == 0:
        return out
    xb = x.detach().index_select(gate.dim, b_idx)
    reduce_dims = [d for d in range(x.dim()) if d != gate.dim]
    sigma = xb.std(dim=reduce_dims, keepdim=True, unbiased=False) if reduce_dims else xb.abs()
    coef = gate._view((1 - lam_pos[b_idx]).sqrt(), xb)
    return out.index_add(gate.dim, b_idx, coef * (sigma * torch.randn_like(xb)))


@pytest.mark.parametrize("shape,dim", [((4, 10, 3, 3), 1), ((5, 7, 10), 2), ((10,), 0), ((6, 10), 1)])
@pytest.mark.parametrize("kappa", [(0.55, 0.3), (1.0, 1.0), (0.1, 0.999), (0.5, 0.5)])
def test_fused_noisy_gate_matches_the_plain_formulation(shape, dim, kappa):
    # 10 positions: group 0 (width 4), a fixed one, group 1 (width 5)
    group = torch.tensor([0, 0, 0, 0, -1, 1, 1, 1, 1, 1])
    ch = torch.tensor([0, 1, 2, 3, 0, 0, 1, 2, 3, 4])
    gate = FeatureGate(dim, group, ch, [4, 5]).train()
    gate.noise = True
    torch.manual_seed(0)
    x0 = torch.randn(*shape, dtype=torch.float64)
    w = torch.randn(*shape, dtype=torch.float64)
    results = []
    for fn in (lambda x, ks: gate(x, *ks), lambda x, ks: reference(gate, x, ks)):
        x = x0.clone().requires_grad_(True)
        ks = [torch.tensor(k, dtype=torch.float64, requires_grad=True) for k in kappa]
        torch.manual_seed(1)
        y = fn(x, ks)
        (y * w).sum().backward()
        results.append((y.detach(), x.grad, [k.grad for k in ks]))
    (y1, gx1, gk1), (y2, gx2, gk2) = results
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(gx1, gx2)
    for a, b in zip(gk1, gk2):
        torch.testing.assert_close(a, b)
        assert torch.isfinite(a)


def test_fused_noisy_gate_keeps_removed_infinities_out():
    gate = FeatureGate(1, torch.zeros(6, dtype=torch.long), torch.arange(6), [6]).train()
    gate.noise = True
    x = torch.randn(3, 6)
    x[:, 5] = float("inf")
    k = torch.tensor(0.5, requires_grad=True)
    y = gate(x, k)
    assert torch.isfinite(y).all() and (y[:, 4:] == 0).all()
    y.sum().backward()
    assert torch.isfinite(k.grad)
