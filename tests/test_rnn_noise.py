"""The recurrent half of the feature noise (``convert(..., rnn_noise=True)``;
dcopt.gates.GatedRNN, optimize phase): the boundary unit's recurrent influence gets noise
too, so the task's pull on an RNN's κ includes what the unit feeds the other units, not
only what the next layer reads."""
import pytest
import torch
from torch import nn

import dcopt
from dcopt.gates import LAMBDA_EPS, GatedRNN

from models import build

H = 8


def gated(mode, bidirectional, noise=True):
    torch.manual_seed(0)
    g = GatedRNN(mode(5, H, num_layers=2, batch_first=True, bidirectional=bidirectional)).train()
    g.noise = noise
    return g


def units(y, lo, hi, D):
    return torch.cat([y[..., d * H + lo: d * H + hi] for d in range(D)], -1)


@pytest.mark.parametrize("mode", [nn.GRU, nn.LSTM])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_the_recurrence_alone_pulls_on_kappa(mode, bidirectional):
    D = 2 if bidirectional else 1
    x = torch.randn(4, 7, 5)
    kappa = torch.tensor(5.5 / H, requires_grad=True)        # boundary unit 5, λ ≈ 0.5, 6 units kept
    for noise in (True, False):
        kappa.grad = None
        y, _ = gated(mode, bidirectional, noise)(kappa, x)
        units(y, 0, 5, D).pow(2).sum().backward()            # the boundary unit's own output is not read
        if noise:
            assert kappa.grad is not None and kappa.grad.abs() > 0
        else:
            assert kappa.grad is None                        # the hard mask alone: no path to κ
        assert units(y, 6, H, D).abs().max() == 0            # removed units stay exactly 0


def test_noise_only_in_training_with_noise_on_and_a_trainable_kappa():
    x = torch.randn(3, 6, 5)
    kappa = torch.tensor(5.5 / H, requires_grad=True)
    g = gated(nn.GRU, False)
    with torch.no_grad():
        masked_eval = g.eval()(kappa, x)[0]
        g.train()
        frozen = g(kappa.detach(), x)[0]                                  # κ frozen: the exact mask
        noisy = g(kappa, x)[0]
        g.noise = False
        off = g(kappa, x)[0]
    assert torch.equal(frozen, off)
    assert torch.allclose(frozen, masked_eval, atol=1e-6, rtol=0)
    assert not torch.allclose(noisy, masked_eval, atol=1e-3)


@pytest.mark.parametrize("D", [1, 2])
def test_boundary_columns_get_scaled_signal_and_noise_of_their_own_rms(D):
    torch.manual_seed(1)
    G = 3
    w = torch.randn(G * H, D * H)
    rows = (torch.arange(H) < 6).float().repeat(G)                 # units 6, 7 removed: their rows stay 0
    w = w * rows[:, None]
    lam = torch.tensor(0.3)
    draws = torch.stack([GatedRNN._recurrent_noise(w, (5, lam), H, D, rows) for _ in range(4000)])
    cols = [5 + d * H for d in range(D)]
    others = [c for c in range(D * H) if c not in cols]
    assert torch.equal(draws[:, :, others], w[None, :, others].expand(len(draws), -1, -1))
    assert (draws[:, rows == 0] == 0).all()
    kept = rows == 1
    for c in cols:
        col = w[kept, c]
        rms = col.pow(2).mean().sqrt()
        mean, std = draws[:, kept, c].mean(0), draws[:, kept, c].std(0)
        assert torch.allclose(mean, lam.sqrt() * col, atol=4 * (1 - lam).sqrt() * rms / 4000 ** 0.5 * 1.5)
        assert torch.allclose(std, (1 - lam).sqrt() * rms.expand_as(std), rtol=0.06)  # rms of the kept rows


def test_no_noise_on_a_unit_already_cut_from_the_recurrence():
    ref = torch.zeros(1)
    # s = 5 exactly: 5 units kept, the boundary unit 5 (λ ≈ 0) is outside the recurrence
    assert GatedRNN._boundary(torch.tensor(5 / H), H, 5, ref) is None
    m, lam = GatedRNN._boundary(torch.tensor(5.25 / H), H, 6, ref)
    assert m == 5 and float(lam) == pytest.approx(LAMBDA_EPS + (1 - 2 * LAMBDA_EPS) * 0.25, rel=1e-4)
    m, lam = GatedRNN._boundary(torch.tensor(1.0), H, H, ref)     # full width: the last unit, λ ≈ 1
    assert m == H - 1 and float(lam) == pytest.approx(1 - LAMBDA_EPS, rel=1e-4)


@pytest.mark.parametrize("option", [True, False])
def test_the_option_and_the_phases_switch_the_recurrent_noise(option):
    model, inputs = build("crnn_gru")
    dm = dcopt.convert(model, inputs, rnn_noise=option)
    rnns = [m for m in dm.modules() if isinstance(m, GatedRNN)]
    assert rnns and not any(m.noise for m in rnns)
    dm.optimize_sizes()
    assert all(m.noise == option for m in rnns)
    dm.fix_sizes()
    assert not any(m.noise for m in rnns)
    assert not dcopt.convert(model, inputs).config.rnn_noise      # off by default


@pytest.mark.parametrize("name", ["crnn_gru", "crnn_lstm"])
def test_trained_with_rnn_noise_the_export_still_equals_eval(name):
    """The recurrent noise changes training only: after optimize steps with it, the eval
    model (exact mask) and the export agree, and the counted MACs are the predicted ones."""
    from checks import assert_exact_export

    model, inputs = build(name)
    dm = dcopt.convert(model, inputs, rnn_noise=True, kappa_min=0.25).optimize_sizes().train()
    opt = torch.optim.Adam(dm.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(5):
        opt.zero_grad()
        (dm(*inputs).pow(2).mean() + dm.complexity_loss()).backward()
        opt.step()
    sizes = {n: max(2, int(0.6 * i.width)) for n, i in dm.sizes().items()}
    assert_exact_export(dm, inputs, sizes)
