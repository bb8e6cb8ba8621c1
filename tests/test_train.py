"""dcopt.train.fit: the fixed → optimize → settle schedule, its history, and what it learns.

The two planted-structure tests train a linear model whose best width is known:
inputs x ~ N(0, I_32), target y = B·(A·x) + 0.1·ε with A: 8×32, B: 16×8 (rank 8) and
ε ~ N(0, I_16); model Linear(32→64) → Linear(64→16), no activation. The dynamic group
is the 64 hidden features; 8 of them suffice. The observation noise puts a floor of
0.01 under the MSE, so "within 10 % of the full model's loss" is a meaningful bar
(without it both losses would be ≈ 0 and the ratio noise).

Hyper-parameters of those tests (chosen to run in seconds on a 2-core CPU):
2048 training samples in batches of 64 (32 steps an epoch), 5 fixed + 30 optimize
epochs, weights Adam lr 1e-2, sizes lr 3e-3 — sizes still ~3× slower than the weights,
the same ratio as fit's defaults (1e-3 / 3e-4), see DESIGN.md "Size dynamics". κ_min is
1/16 (a floor of 4 features, below the rank, so landing on the floor would not pass for
finding the structure). With the L2 pressure β = 4 (one group, so the term is 4·κ²)
the size falls from 64 to 9–11 and stays there (measured on 4 noise seeds: kept 9–11,
loss ratio to the full model 0.93–0.97; the rank-limited model overfits the 2048
samples less than the full one).
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import dcopt
from dcopt.train import History, fit

D_IN, RANK, HIDDEN, D_OUT = 32, 8, 64, 16


pytestmark = pytest.mark.usefixtures("one_thread")


def mse(out, y):
    return nn.functional.mse_loss(out, y)


def l1(out, y):
    return (out - y).abs().mean()


def batches(x, y, bs):
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, len(x), bs)]


# -- a tiny MLP: mechanics ---------------------------------------------------------------

class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 24)
        self.fc2 = nn.Linear(24, 16)
        self.fc3 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def mlp_data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.stack([x[:, 0] * x[:, 1], x[:, 2].relu(), x[:, 3] - x[:, 4]], 1)
    return batches(x, y, 32)


def tiny_dm(**options):
    torch.manual_seed(0)
    model = MLP()
    dm = dcopt.convert(model, (torch.randn(4, 8),), kappa_min=0.25, **options)
    return model, dm


def test_fit_runs_all_three_phases_and_records_history():
    model, dm = tiny_dm(beta=2.0)
    before = copy.deepcopy(model.state_dict())
    hist = fit(dm, mlp_data(), mse, fixed_epochs=2, optimize_epochs=3, settle_epochs=2, lr=3e-3,
               size_lr=3e-2, val_data=mlp_data(64, seed=1), metric_fn=l1, progress=False)
    assert isinstance(hist, History) and len(hist) == 7
    assert [r.phase for r in hist.epochs] == ["fixed"] * 2 + ["optimize"] * 3 + ["settle"] * 2
    assert [r.epoch for r in hist.epochs] == list(range(1, 8))
    assert [r.phase_epoch for r in hist.epochs] == [1, 2, 1, 2, 3, 1, 2]
    assert len(hist.phase("optimize")) == 3 and hist.last is hist.epochs[-1]
    names = dm.group_names
    assert hist.widths == {n: i.width for n, i in dm.sizes().items()}
    for r in hist.epochs:
        assert r.steps == 8 and r.seconds >= 0
        for v in (r.train_loss, r.val_loss, r.metric, r.macs_fraction, r.params_fraction, r.beta):
            assert isinstance(v, float) and v == v  # finite, not NaN
        assert 0.0 < r.macs_fraction <= 1.0 and 0.0 < r.params_fraction <= 1.0
        assert list(r.sizes) == names and list(r.kappa) == names
        assert all(0.25 <= k <= 1.0 for k in r.kappa.values())
        assert r.complexity_loss == 0.0 if r.phase != "optimize" else r.complexity_loss > 0.0
    # the task was learned in the fixed phase, and the pressure shrank something
    assert hist.epochs[1].train_loss < hist.epochs[0].train_loss
    assert hist.last.macs_fraction < 1.0
    # the last record matches the model as fit leaves it: sizes fixed, noise off
    assert dm.phase == "fixed" and hist.last.sizes == {n: i.kept for n, i in dm.sizes().items()}
    assert hist.last.macs_fraction == pytest.approx(float(dm.complexity(at="kept").macs_fraction))
    # plain data, JSON-serialisable
    d = hist.to_dict()
    assert json.loads(json.dumps(d))["epochs"][3]["phase"] == "optimize"
    # fit trains the DynamicModel, never the user's model (DESIGN invariant 1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # and what it leaves behind exports (export checks equality with the eval-mode model)
    small = dcopt.export(dm)
    assert small.fc1.out_features == hist.last.sizes["fc1"]


def test_sizes_move_only_in_the_optimize_phase_and_weights_train_in_every_phase():
    _, dm = tiny_dm(beta=4.0)
    snaps = {}

    def weights():
        return [p.detach().clone() for p in dm.weight_parameters()]

    data = mlp_data()
    start = weights()
    hist = fit(dm, data, mse, fixed_epochs=2, optimize_epochs=0, lr=3e-3, progress=False, trace_kappa=True)
    snaps["fixed"] = weights()
    assert all(k == 1.0 for p in hist.kappa_trace for k in p.kappa.values())
    assert len(hist.kappa_trace) == 16 and {p.phase for p in hist.kappa_trace} == {"fixed"}

    hist = fit(dm, data, mse, fixed_epochs=0, optimize_epochs=3, settle_epochs=3, lr=3e-3, size_lr=3e-2,
               progress=False, trace_kappa=True)
    opt_trace = [p.kappa for p in hist.kappa_trace if p.phase == "optimize"]
    settle_trace = [p.kappa for p in hist.kappa_trace if p.phase == "settle"]
    assert len(opt_trace) == 24 and len(settle_trace) == 24
    assert opt_trace[-1] != opt_trace[0] and min(opt_trace[-1].values()) < 1.0  # sizes moved...
    assert all(k == opt_trace[-1] for k in settle_trace)                        # ...then froze
    assert len({json.dumps(r.sizes) for r in hist.phase("settle")}) == 1
    assert hist.phase("settle")[0].sizes == hist.phase("optimize")[-1].sizes
    # weights are trained in every phase
    changed = lambda a, b: any(not torch.equal(x, y) for x, y in zip(a, b))  # noqa: E731
    assert changed(start, snaps["fixed"]) and changed(snaps["fixed"], weights())


def test_zero_epochs_changes_nothing():
    _, dm = tiny_dm()
    before = copy.deepcopy(dm.state_dict())
    hist = fit(dm, mlp_data(), mse, fixed_epochs=0, optimize_epochs=0, progress=False)
    assert len(hist) == 0 and hist.last is None
    assert all(torch.equal(before[k], v) for k, v in dm.state_dict().items() if isinstance(v, torch.Tensor))


def test_beta_only_adapts_in_the_optimize_phase():
    _, dm = tiny_dm(target_macs=0.5, beta=0.5)
    hist = fit(dm, mlp_data(), mse, fixed_epochs=2, optimize_epochs=2, settle_epochs=2, size_lr=3e-2,
               progress=False)
    betas = hist.column("beta")
    assert betas[0] == betas[1] == 0.5          # fixed: untouched
    assert betas[2] != 0.5                      # optimize: dual ascent
    assert betas[3] == betas[4] == betas[5]     # settle: untouched


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 12)
        self.b = nn.Linear(6, 12)
        self.head = nn.Linear(12, 2)

    def forward(self, x, z):
        return self.head(torch.relu(self.a(x)) + torch.relu(self.b(z)))


class PairDataset(torch.utils.data.Dataset):
    def __init__(self, n=96):
        g = torch.Generator().manual_seed(0)
        self.x, self.z = torch.randn(n, 4, generator=g), torch.randn(n, 6, generator=g)
        self.y = torch.randn(n, 2, generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return (self.x[i], self.z[i]), self.y[i]


def test_dataloader_with_tuple_inputs_and_progress_bar(capsys):
    torch.manual_seed(0)
    dm = dcopt.convert(TwoInputs(), (torch.randn(2, 4), torch.randn(2, 6)), beta=1.0)
    loader = torch.utils.data.DataLoader(PairDataset(), batch_size=32, shuffle=True)
    hist = fit(dm, loader, mse, fixed_epochs=1, optimize_epochs=1, settle_epochs=1, val_data=loader,
               metric_fn=l1, progress=True)
    assert len(hist) == 3 and hist.last.metric is not None
    out = capsys.readouterr().out
    assert "optimize" in out and "MACs" in out


def test_lazy_model_converts_on_first_batch():
    torch.manual_seed(0)
    dm = dcopt.convert(MLP(), beta=1.0)
    hist = fit(dm, mlp_data(), mse, fixed_epochs=1, optimize_epochs=1, progress=False)
    assert len(hist) == 2 and set(hist.last.sizes) == {"fc1", "fc2"}


def test_bad_arguments():
    _, dm = tiny_dm()
    with pytest.raises(ValueError, match="fixed_epochs"):
        fit(dm, mlp_data(), mse, fixed_epochs=-1, optimize_epochs=1, progress=False)
    with pytest.raises(ValueError, match="optimizer"):
        fit(dm, mlp_data(), mse, fixed_epochs=1, optimize_epochs=0, optimizer="lbfgs", progress=False)
    once = iter(mlp_data())  # a generator is spent after one epoch
    with pytest.raises(ValueError, match="re-iterable"):
        fit(dm, once, mse, fixed_epochs=2, optimize_epochs=0, progress=False)
    with pytest.raises(TypeError, match="DynamicModel"):
        fit(MLP(), mlp_data(), mse, fixed_epochs=1, optimize_epochs=0, progress=False)


def test_custom_optimizer_factory():
    _, dm = tiny_dm()
    seen = []

    def make(groups):
        seen.append([g["name"] for g in groups])
        return torch.optim.SGD(groups, lr=1e-2)

    fit(dm, mlp_data(), mse, fixed_epochs=1, optimize_epochs=1, optimizer=make, progress=False)
    assert seen == [["weights", "sizes"]]


# -- planted low-rank structure: what the method learns -----------------------------------

def planted_data():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(RANK, D_IN, generator=g) / D_IN ** 0.5
    B = torch.randn(D_OUT, RANK, generator=g) / RANK ** 0.5

    def sample(n):
        x = torch.randn(n, D_IN, generator=g)
        return x, x @ A.T @ B.T + 0.1 * torch.randn(n, D_OUT, generator=g)

    xtr, ytr = sample(2048)
    xte, yte = sample(1024)
    return batches(xtr, ytr, 64), batches(xte, yte, 512), xtr[:8]


def planted_model():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Linear(HIDDEN, D_OUT))


FIXED, OPTIMIZE = 5, 30
KAPPA_MIN = 0.0625  # a floor of 4 features: collapsing to the floor is not finding the rank
TRAIN = dict(lr=1e-2, size_lr=3e-3, progress=False)


@pytest.fixture(scope="module")
def planted():
    return planted_data()


@pytest.fixture(scope="module")
def full_loss(planted):
    """The full-width model trained for the same total number of epochs, fixed phase only."""
    torch.set_num_threads(1)
    train, val, example = planted
    dm = dcopt.convert(planted_model(), (example,))
    hist = fit(dm, train, mse, fixed_epochs=FIXED + OPTIMIZE, optimize_epochs=0, val_data=val, **TRAIN)
    assert hist.last.sizes == {"0": HIDDEN}
    return hist.last.val_loss


def test_planted_rank_l2_finds_the_structure(planted, full_loss):
    train, val, example = planted
    dm = dcopt.convert(planted_model(), (example,), regularizer="l2", beta=4.0, kappa_min=KAPPA_MIN)
    torch.manual_seed(0)
    hist = fit(dm, train, mse, fixed_epochs=FIXED, optimize_epochs=OPTIMIZE, val_data=val, **TRAIN)
    kept = hist.last.sizes["0"]
    ratio = hist.last.val_loss / full_loss
    print(f"L2 toy: kept {kept}/{HIDDEN}, val loss {hist.last.val_loss:.5f} vs full {full_loss:.5f} "
          f"(ratio {ratio:.3f})")
    assert RANK <= kept <= 2 * RANK
    assert ratio <= 1.10
    small = dcopt.export(dm)
    assert small[0].out_features == kept


# Budget mode: an augmented Lagrangian on the MACs fraction (dcopt/rewrite.py complexity_loss).
# Plain dual ascent (an integral controller) against sizes that Adam moves at a bounded
# speed overshot far below the target (kept 8/64, MACs 0.125); with the quadratic term
# ρ/2·(frac − target)² and the straight-through κ clamp it lands at 19–20 features.
BUDGET = dict(target_macs=0.3, beta=0.0, kappa_min=KAPPA_MIN)  # library defaults: dual_lr, budget_rho


def test_planted_rank_budget_mode_lands_on_target(planted):
    train, val, example = planted
    dm = dcopt.convert(planted_model(), (example,), **BUDGET)
    torch.manual_seed(0)
    hist = fit(dm, train, mse, fixed_epochs=FIXED, optimize_epochs=OPTIMIZE, val_data=val, **TRAIN)
    frac = float(dm.complexity(at="kept").macs_fraction)
    print(f"budget toy: kept {hist.last.sizes['0']}/{HIDDEN}, MACs fraction {frac:.4f} (target 0.3), "
          f"β {hist.last.beta:.3f}")
    assert abs(frac / 0.3 - 1) <= 0.05
    assert frac <= 0.3 and hist.budget_landing.met   # the landing: never above the budget
