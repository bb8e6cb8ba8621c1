"""Budget mode's landing (dcopt/budget.py): integer sizes within the budget, as large as it
allows, in the learned proportions; and fit ending its optimize phase with it."""
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import dcopt
from dcopt import land_on_budget
from dcopt.gates import consolidated, round_size
from tests.checks import assert_exact_export


class ConvNet(nn.Module):
    """Three groups of different widths and costs (conv channels cost by area)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 24, 3, padding=1)
        self.c2 = nn.Conv2d(24, 40, 3, padding=1)
        self.fc1 = nn.Linear(40, 32)
        self.fc2 = nn.Linear(32, 5)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc2(torch.relu(self.fc1(x.mean((2, 3)))))


INPUTS = (torch.randn(2, 3, 8, 8),)


def make_dm(kappas, round_to=1, kappa_min=0.05, target=0.3):
    torch.manual_seed(0)
    dm = dcopt.convert(ConvNet(), INPUTS, target_macs=target, kappa_min=kappa_min, round_to=round_to)
    with torch.no_grad():
        for k, v in zip(dm.size_parameters(), kappas):
            k.fill_(v)
    return dm


def kept_macs(dm) -> float:
    return float(dm.complexity(at="kept").macs_fraction)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kappas=st.lists(st.floats(0.05, 1.0), min_size=3, max_size=3), target=st.floats(0.02, 1.0),
       round_to=st.sampled_from([1, 4]), grow=st.booleans(), kappa_min=st.sampled_from([0.05, 0.3]))
def test_landing_meets_the_budget_and_cannot_grow(kappas, target, round_to, grow, kappa_min):
    dm = make_dm(kappas, round_to, kappa_min, target)
    widths = {n: i.width for n, i in dm.sizes().items()}
    before = {n: i.kept for n, i in dm.sizes().items()}
    landing = land_on_budget(dm, grow=grow)
    after = {n: i.kept for n, i in dm.sizes().items()}
    assert after == landing.after
    assert landing.macs_after == pytest.approx(kept_macs(dm), rel=1e-12)
    floors = {n: consolidated(torch.tensor(kappa_min), w, round_to) for n, w in widths.items()}
    if not landing.met:  # only when the floors themselves break the budget
        assert after == floors and kept_macs(dm) > target
        return
    assert kept_macs(dm) <= target * (1 + 1e-9)
    for n, k in after.items():
        assert k % round_to == 0 or k == widths[n]
        if not grow:
            assert k <= max(before[n], floors[n])
    # maximal: no group can take one more step and stay within the budget
    for n, k in after.items():
        nxt = round_size(k + 1, widths[n], round_to)
        if nxt == k or (not grow and nxt > before[n]):
            continue
        dm.set_sizes({**after, n: nxt})
        assert kept_macs(dm) > target * (1 + 1e-9), (n, k, nxt)
    dm.set_sizes(after)


@settings(max_examples=20, deadline=None)
@given(kappas=st.lists(st.floats(0.1, 1.0), min_size=3, max_size=3), target=st.floats(0.05, 0.9))
def test_landing_twice_changes_nothing(kappas, target):
    dm = make_dm(kappas, target=target)
    first = land_on_budget(dm)
    second = land_on_budget(dm)
    assert second.after == first.after and not second.changed


def test_landing_keeps_the_learned_proportions():
    # group 0 learned a third of its width, the others all of theirs: shrinking to the
    # budget scales all three by one factor instead of taking it from one group
    dm = make_dm([1 / 3, 1.0, 1.0], target=0.2)
    s = {n: i.s for n, i in dm.sizes().items()}
    landing = land_on_budget(dm)
    assert landing.met and landing.scale < 1
    # the two convolutions (nearly all the MACs) shrink by about the same factor; what is
    # left of the budget then goes to the cheap linear group (fill)
    r1, r2 = landing.after["c1"] / s["c1"], landing.after["c2"] / s["c2"]
    assert r1 < 1 and r2 < 1 and abs(r1 - r2) <= 0.1, (landing.after, s)
    assert landing.after["fc1"] >= landing.scale * s["fc1"]


def test_landing_grows_to_the_budget_and_stays_exact():
    dm = make_dm([0.3, 0.3, 0.3], target=0.5)
    assert kept_macs(dm) < 0.4
    landing = land_on_budget(dm)
    assert landing.met and landing.macs_after > 0.45 and landing.changed
    dm.eval()
    assert_exact_export(dm, INPUTS, others=[(torch.randn(3, 3, 8, 8),)])


def test_floors_above_the_budget_keep_the_floors():
    dm = make_dm([1.0, 1.0, 1.0], kappa_min=0.5, target=0.02)
    landing = land_on_budget(dm)
    assert not landing.met
    assert landing.after == {n: -(-i.width // 2) for n, i in dm.sizes().items()}


def test_landing_needs_a_target():
    torch.manual_seed(0)
    dm = dcopt.convert(ConvNet(), INPUTS)
    with pytest.raises(ValueError, match="target"):
        land_on_budget(dm)
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        land_on_budget(dm, target=1.5)
    land_on_budget(dm, target=0.5)
    assert kept_macs(dm) <= 0.5


def data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = torch.stack([x[:, 0].mean((1, 2)), x[:, 1].amax((1, 2)), x[:, 2].std((1, 2)), x[:, 0, 0, 0],
                     x.mean((1, 2, 3))], 1)
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, n, 16)]


@pytest.mark.parametrize("settle", [0, 2])
def test_fit_ends_budget_mode_within_the_budget(settle):
    dm = make_dm([1.0, 1.0, 1.0], target=0.3)
    torch.manual_seed(0)
    hist = dcopt.fit(dm, data(), nn.functional.mse_loss, fixed_epochs=1, optimize_epochs=3, settle_epochs=settle,
                     lr=1e-2, size_lr=5e-2, progress=False)
    landing = hist.budget_landing
    assert landing is not None and landing.met
    assert landing.before == hist.phase("optimize")[-1].sizes
    assert {n: i.kept for n, i in dm.sizes().items()} == landing.after == hist.final_sizes
    for rec in hist.phase("settle"):
        assert rec.sizes == landing.after and rec.macs_fraction <= 0.3 + 1e-9
    if settle == 0:   # nothing trains the features it would switch back on: only shrink
        assert all(landing.after[n] <= k for n, k in landing.before.items())
    small = dcopt.export(dm)
    assert dcopt.count_macs(small, INPUTS) <= 0.3 * dcopt.count_macs(ConvNet(), INPUTS)
    assert hist.to_dict()["budget_landing"]["after"] == landing.after == hist.to_dict()["final_sizes"]


def test_fit_warns_when_the_floors_break_the_budget():
    dm = make_dm([1.0, 1.0, 1.0], kappa_min=0.5, target=0.02)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hist = dcopt.fit(dm, data(), nn.functional.mse_loss, fixed_epochs=0, optimize_epochs=1, progress=False)
    assert not hist.budget_landing.met
    assert any("kappa_min floor" in str(w.message) for w in caught)


def test_other_modes_do_not_land():
    torch.manual_seed(0)
    dm = dcopt.convert(ConvNet(), INPUTS, beta=0.1)
    hist = dcopt.fit(dm, data(), nn.functional.mse_loss, fixed_epochs=0, optimize_epochs=1, progress=False)
    assert hist.budget_landing is None


def test_fit_cuts_a_lagging_budget_in_the_second_half():
    # sizes far too slow to reach the budget by themselves: from the second half on, each
    # epoch that ends above it is cut back, and the next epoch trains at the cut sizes
    dm = make_dm([1.0, 1.0, 1.0], target=0.3)
    torch.manual_seed(0)
    hist = dcopt.fit(dm, data(), nn.functional.mse_loss, fixed_epochs=0, optimize_epochs=4, settle_epochs=1,
                     lr=1e-2, size_lr=1e-6, progress=False)
    opt = hist.phase("optimize")
    assert [r.budget_cut is not None for r in opt] == [False, True, False, False]
    assert opt[0].macs_fraction > 0.3 and opt[1].macs_fraction > 0.3   # the records: before the cut
    dm_cut = make_dm([1.0, 1.0, 1.0], target=0.3)
    dm_cut.set_sizes(opt[1].budget_cut)
    assert kept_macs(dm_cut) <= 0.3
    assert opt[2].sizes == opt[1].budget_cut                        # trained on from the cut sizes
    assert hist.budget_landing.met


def test_a_model_without_groups_lands_as_it_is():
    dm = dcopt.convert(nn.Sequential(nn.Linear(4, 2)), (torch.randn(2, 4),), target_macs=0.5)   # touches I/O only
    assert not dm.sizes()
    landing = land_on_budget(dm)
    assert landing.after == {} and not landing.met and landing.macs_after == 1.0


_CONVERTED = {}


def _converted(name):
    if name not in _CONVERTED:
        from tests.models import build
        model, inputs = build(name)
        _CONVERTED[name] = dcopt.convert(model, inputs)
    return _CONVERTED[name]


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(["mlp", "conv_bn_flatten", "crnn_gru", "crnn_lstm", "lstm", "residual", "dense_concat",
                             "transformer_ffn", "depthwise_separable", "layerscale_se", "sliced"]),
       data=st.data())
def test_plain_integer_macs_equal_the_differentiable_count(name, data):
    # the landing searches with ComplexityModel.macs_at (plain Python); it must agree
    # exactly with the differentiable count at every integer size
    dm = _converted(name)
    widths = [i.width for i in dm.sizes().values()]
    sizes = [data.draw(st.integers(1, w)) for w in widths]
    cx = dm._cx([torch.tensor(float(k), dtype=torch.float64) for k in sizes])
    assert dm._cx.macs_at(sizes) == pytest.approx(float(cx.macs), rel=1e-12, abs=1e-9)


def test_landing_within_the_budget_leaves_kappa_alone():
    # the mid-phase cut calls the landing every epoch of the second half: sizes already
    # within the budget must keep their continuous κ (training goes on from them)
    dm = make_dm([0.37, 0.41, 0.29], target=0.9)
    kappas = [float(k) for k in dm.size_parameters()]
    landing = land_on_budget(dm, grow=False)
    assert not landing.changed
    assert [float(k) for k in dm.size_parameters()] == kappas
