"""What the gated model does while it trains, which the export checks (eval mode) cannot
see: found by a red-team pass on the training path, each fixed and pinned here."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dcopt
from dcopt.gates import FeatureGate

pytestmark = pytest.mark.usefixtures("one_thread")


def _wide(n):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, n), nn.ReLU(), nn.Linear(n, 3))
    x = torch.randn(64, 10)
    dm = dcopt.convert(model, (x,))
    dm.optimize_sizes()
    dm.train()
    return dm, x


@pytest.mark.parametrize("kappa", [0.6985, 0.7013, 0.5021])
def test_under_bfloat16_autocast_the_noise_boundary_is_where_float32_puts_it(kappa):
    """s = κ·N was computed in the activations' dtype: in bfloat16 the train-mode model
    used up to 3 features of 1000 that eval and export drop."""
    dm, x = _wide(1000)
    gate = next(g for g in dm.modules() if isinstance(g, FeatureGate))
    seen = {}
    gate.register_forward_hook(lambda mod, i, o: seen.__setitem__("out", o.detach()))
    (k,) = dm.size_parameters()
    with torch.no_grad():
        k.fill_(kappa)
    reach = {}
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            dm(x)
        reach[autocast] = int((seen["out"] != 0).any(0).nonzero().max()) + 1
    assert reach[True] == reach[False] == int(float(k.detach()) * 1000) + 1


def test_under_bfloat16_autocast_kappa_gets_its_gradient_at_full_width():
    """1003 is 1004 in bfloat16: the boundary fell past the last feature at κ = 1, where
    every optimize phase starts, and no task gradient reached κ (then 1 − ε rounded to 1
    made it infinite)."""
    dm, x = _wide(1003)
    y = torch.randn(64, 3)
    (k,) = dm.size_parameters()
    grads = {}
    for autocast in (False, True):
        k.grad = None
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = dm(x)
        F.mse_loss(out.float(), y).backward()
        grads[autocast] = float(k.grad)
    assert torch.isfinite(torch.tensor(grads[True])) and grads[True] != 0.0
    assert grads[True] == pytest.approx(grads[False], rel=0.05)


class _RNN(nn.Module):
    def __init__(self, mode, hidden=10):
        super().__init__()
        self.fc0, self.rnn, self.fc = nn.Linear(6, 12), getattr(nn, mode)(12, hidden, batch_first=True), \
            nn.Linear(hidden, 3)

    def forward(self, x):
        return self.fc(self.rnn(torch.relu(self.fc0(x)))[0])


@pytest.mark.parametrize("mode", ["GRU", "LSTM"])
def test_an_rnn_model_cast_to_float64_mid_optimize_trains_on(mode):
    """The recurrent noise's cached σ stayed float32: index_copy_ raised a dtype error."""
    torch.manual_seed(0)
    x = torch.randn(4, 5, 6)
    dm = dcopt.convert(_RNN(mode), (x,))
    dm.optimize_sizes()
    dm.train()
    dm(x).sum().backward()
    dm.to(torch.float64)
    dm(x.double()).sum().backward()


@pytest.mark.parametrize("mode", ["GRU", "LSTM"])
def test_with_round_to_units_beyond_the_noisy_boundary_are_cut_from_the_recurrence(mode):
    """The output gate cuts units beyond the boundary m; the recurrence kept round_to(⌈s⌉)
    units clean, so units m+1 .. 7 still drove every gate (round_to=8, s = 4.5)."""
    torch.manual_seed(0)
    x = torch.randn(4, 6, 6)
    dm = dcopt.convert(_RNN(mode, hidden=16), (x,), round_to=8)
    dm.optimize_sizes()
    dm.train()
    k = dict(zip(dm.group_names, dm.size_parameters()))["rnn"]
    with torch.no_grad():
        k.fill_(4.5 / 16)
    dm(x).sum().backward()
    whh = dm.gm.rnn.rnn.weight_hh_l0
    rows = torch.cat([torch.arange(g * 16 + 5, g * 16 + 8) for g in range(whh.shape[0] // 16)])
    assert float(whh.grad[rows].abs().sum()) == 0.0
    assert float(whh.grad[rows - 2].abs().sum()) > 0.0   # units up to the boundary do train


def test_budget_mode_complexity_loss_twice_before_backward():
    """The dual step wrote β in place, and the first term had saved β: backward refused
    ("modified by an inplace operation") after a second call, for logging or for
    gradient accumulation over two micro-batches."""
    torch.manual_seed(0)
    x = torch.randn(8, 10)
    dm = dcopt.convert(nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3)), (x,), target_macs=0.3)
    dm.optimize_sizes()
    dm.train()
    first = dm(x).pow(2).mean() + dm.complexity_loss()
    second = dm(x).pow(2).mean() + dm.complexity_loss()
    (first + second).backward()
    assert all(p.grad is not None for p in dm.size_parameters())


class _TrainOnlyHead(nn.Module):
    """A train-mode-only term, as GoogLeNet's and Inception's auxiliary classifiers."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.aux = nn.Linear(8, 32), nn.Linear(32, 4), nn.Linear(32, 4)

    def forward(self, x):
        h = self.fc1(x).relu()
        out = self.fc2(h)
        if self.training:
            out = out + 0.3 * self.aux(h)
        return out


class _ZeroDropout(nn.Module):
    """``training=self.training`` reaches the graph, but p = 0 changes no number (Swin)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(F.dropout(self.fc1(x).relu(), p=0.0, training=self.training))


def test_a_forward_that_branches_on_training_is_flagged_and_exported_as_traced():
    """fx fixes self.training at its eval value: the converted model trains without the
    train-only term, silently, and an export of the user's class ran the term on resized
    layers (a crash in train mode after fit). Now: a warning naming the line, and the
    export is the traced graph, which computes what the gated model computes."""
    torch.manual_seed(0)
    x = torch.randn(5, 8)
    with pytest.warns(UserWarning, match=r"something else in train mode.*'aux'.*test_training_holes.py"):
        dm = dcopt.convert(_TrainOnlyHead(), (x,))
    dm.set_sizes({"fc1": 8})
    small = dcopt.export(dm)
    assert isinstance(small, torch.fx.GraphModule)
    dm.train()
    small.train()
    torch.testing.assert_close(small(x), dm(x))


def test_a_training_flag_that_changes_no_number_is_not_flagged():
    torch.manual_seed(0)
    x = torch.randn(5, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm = dcopt.convert(_ZeroDropout(), (x,))
    dm.set_sizes({"fc1": 8})
    assert isinstance(dcopt.export(dm), _ZeroDropout)
