"""The recurrent half of the feature noise (``convert(..., rnn_noise=True)``, the default;
dcopt.gates.GatedRNN and dcopt/rnn_noise.py, optimize phase): the boundary unit's recurrent
influence gets per-step noise too, so the task's pull on an RNN's κ includes what the unit
feeds the other units, not only what the next layer reads."""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import dcopt

from dcopt.gates import LAMBDA_EPS, GatedRNN
from dcopt.rnn_noise import SigmaCache, step_noise_forward

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


LAYOUTS = [(mode, L, bi, bf) for mode in (nn.GRU, nn.LSTM, nn.RNN) for L in (1, 2)
           for bi in (False, True) for bf in (True, False)]


@pytest.mark.parametrize("mode,L,bi,bf", LAYOUTS)
def test_at_full_share_the_layer_by_layer_run_is_the_rnn(mode, L, bi, bf):
    """λ = 1 puts no noise anywhere: the layer-by-layer run with its extra input channels
    must then be the RNN itself, for every layout (batch first or not, unbatched, packed,
    with and without a given hidden state)."""
    torch.manual_seed(0)
    rnn = mode(5, H, num_layers=L, batch_first=bf, bidirectional=bi)
    params, sigmas, one = dict(rnn.named_parameters()), SigmaCache(), torch.tensor(1.0)
    x = torch.randn(3, 7, 5) if bf else torch.randn(7, 3, 5)

    def same(a, b):
        a, b = (a.data, b.data) if isinstance(a, PackedSequence) else (a, b)
        a, b = (torch.cat(a), torch.cat(b)) if isinstance(a, tuple) else (a, b)
        assert torch.allclose(a, b, atol=1e-6, rtol=0)

    for args in [(x,), (x, rnn(x)[1]), (x[0] if bf else x[:, 0],),
                 (pack_padded_sequence(x, torch.tensor([7, 3, 5]), batch_first=bf, enforce_sorted=False),)]:
        if len(args) == 1 and isinstance(args[0], PackedSequence):
            args = args + (rnn(args[0])[1],)
        got, want = step_noise_forward(rnn, params, 3, one, sigmas, *args), rnn(*args)
        same(got[0], want[0])
        same(got[1], want[1])
    assert set(sigmas.std) == set(sigmas.boundary) == set(range(L)) and sigmas.std[0].shape == (2 if bi else 1, H)


def manual(rnn, x, m, lam, sigma, nu):
    """One layer, batch first, written out: every gate reads √λ·h_m(t−1) + √(1−λ)·σ·ν(t) in
    place of h_m(t−1); the GRU's candidate gets that noise without the reset gate's factor
    (dcopt/rnn_noise.py says why), each unit's own carry stays clean."""
    w_ih, w_hh, b_ih, b_hh = rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0
    h = x.new_zeros(x.shape[0], H)
    c = torch.zeros_like(h)
    scaled = w_hh.clone()
    scaled[:, m] *= lam ** 0.5
    outs = []
    for t in range(x.shape[1]):
        q = (1 - lam) ** 0.5 * sigma * nu[:, t, :1] * w_hh[:, m]          # the noise share, through column m
        gi, gh = x[:, t] @ w_ih.T + b_ih + q, h @ scaled.T + b_hh
        if rnn.mode == "GRU":
            (ir, iz, i_n), (hr, hz, hn) = gi.chunk(3, 1), gh.chunk(3, 1)
            r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
            h = (1 - z) * torch.tanh(i_n + r * hn) + z * h
        elif rnn.mode == "LSTM":
            i, f, g, o = (gi + gh).chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        else:
            h = torch.tanh(gi + gh)
        outs.append(h)
    return torch.stack(outs, 1)


@pytest.mark.parametrize("mode", [nn.GRU, nn.LSTM, nn.RNN])
def test_the_boundary_unit_reaches_the_recurrence_as_per_step_noise(mode):
    torch.manual_seed(0)
    rnn = mode(5, H, batch_first=True)
    params, sigmas, m, lam = dict(rnn.named_parameters()), SigmaCache(), 5, torch.tensor(0.3)
    x = torch.randn(4, 9, 5)
    step_noise_forward(rnn, params, m, lam, sigmas, x)          # measures σ, then a noisy forward
    sigma, sigma_all = sigmas.std[0][0, m], sigmas.std[0][0].clone()
    torch.manual_seed(7)
    got = step_noise_forward(rnn, params, m, lam, sigmas, x)[0]
    torch.manual_seed(7)
    nu = torch.randn(4, 9, 1)
    with torch.no_grad():
        assert torch.allclose(got, manual(rnn, x, m, float(lam), sigma, nu), atol=1e-5, rtol=0)
        assert not torch.allclose(got, rnn(x)[0], atol=1e-3)   # and the noise is there
    # σ for the next forward: fresh for the units the boundary can move to, kept for the rest
    before = sigma_all.clone()
    fresh = got.detach().reshape(-1, H).std(0, unbiased=False)
    assert torch.allclose(sigmas.std[0][0, m - 1:m + 2], fresh[m - 1:m + 2], atol=1e-6)
    assert torch.equal(sigmas.std[0][0, :m - 1], before[:m - 1]) and torch.equal(sigmas.std[0][0, m + 2:], before[m + 2:])
    sigmas.boundary[0] = m - 3                                    # a jump (set_sizes, a backtrack): all of them again
    step_noise_forward(rnn, params, m, lam, sigmas, x)
    assert not torch.equal(sigmas.std[0][0, :m - 1], before[:m - 1])


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
    assert dcopt.convert(model, inputs).config.rnn_noise          # on by default


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


def test_the_sigma_cache_round_trips_as_plain_data_and_reads_the_earlier_layout():
    cache = SigmaCache({0: torch.rand(2, 4), 1: torch.rand(2, 4)}, {0: 2, 1: 3})
    state = cache.state()
    assert state["std"][0] is not cache.std[0] and torch.equal(state["std"][0], cache.std[0])
    back = SigmaCache()
    back.load(state)
    assert back.boundary == {0: 2, 1: 3} and all(torch.equal(back.std[k], cache.std[k]) for k in (0, 1))
    old = SigmaCache()
    old.load({0: cache.std[0], 1: cache.std[1], "m": {0: 2, 1: 3}})   # a checkpoint written before SigmaCache
    assert old.boundary == back.boundary and set(old.std) == {0, 1} and torch.equal(old.std[1], cache.std[1])
    assert not SigmaCache() and back
