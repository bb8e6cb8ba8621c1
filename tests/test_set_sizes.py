"""set_sizes keeps exactly the sizes asked for, on groups of any width, and a refused call
changes nothing.

κ is a float32 Parameter: n/N rounded to float32 misses n by up to N·2⁻²⁵ features, more
than the absolute INT_TOL on groups wider than ~33.5k, where ⌈s⌉ kept n+1 while export
sliced to n and the budget landing reported a budget met that the kept model broke."""
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import dcopt
from dcopt.gates import consolidated, floor_size, kappa_for, kept_size, round_size
from checks import assert_exact_export

KAPPA_MINS = st.sampled_from([0.125, 0.1, 0.05, 0.3, 0.7, 1 / 3, 1.0]) | st.floats(1e-6, 1.0)


@settings(max_examples=400, deadline=None)
@given(N=st.integers(1, 2 ** 24), data=st.data(), kappa_min=KAPPA_MINS,
       dtype=st.sampled_from([torch.float32, torch.float64]), round_to=st.sampled_from([1, 8]))
@example(N=40000, data=None, kappa_min=0.125, dtype=torch.float32, round_to=1)
def test_kappa_for_keeps_exactly_n(N, data, kappa_min, dtype, round_to):
    lo = floor_size(kappa_min, N, dtype)
    n = 20043 if data is None else data.draw(st.integers(lo, N), label="n")
    k = kappa_for(n, N, dtype, kappa_min)
    assert k.dtype == dtype
    # what sizes() and the gates see: κ clamped to κ_min (a no-op here), then ⌈s⌉
    assert torch.equal(k.clamp(kappa_min, 1.0), k)
    assert consolidated(k.clamp(kappa_min, 1.0), N) == n
    assert consolidated(k, N, round_to) == round_size(n, N, round_to)


@settings(max_examples=300, deadline=None)
@given(N=st.integers(1, 2 ** 24), kappa_min=KAPPA_MINS)
@example(N=700000, kappa_min=0.1)   # float32(0.1)·N = 70000.00104: κ clamped to κ_min keeps 70001
@example(N=4000000, kappa_min=0.7)  # float32(0.7) is below 0.7
def test_floor_is_what_kappa_min_keeps(N, kappa_min):
    """The floor is a size the clamped κ can keep, and the float32 floor is one the float64
    copy (export's second opinion) accepts too."""
    lo32, lo64 = floor_size(kappa_min, N, torch.float32), floor_size(kappa_min, N, torch.float64)
    assert lo32 >= lo64 >= kept_size(kappa_min * N, N)
    at_min = torch.tensor(kappa_min, dtype=torch.float32).clamp(kappa_min, 1.0)
    assert consolidated(at_min, N) <= lo32


@pytest.mark.parametrize("N", [5, 1000, 33554, 40000, 2 ** 23 + 1, 2 ** 24])
def test_trained_kappa_keeps_ceil(N):
    """A κ that was trained, not set, still keeps ⌈s⌉ with the small tolerance a hair above
    an integer."""
    for s, kept in ((1.5, 2), (3.0, 3), (3.0004, 3), (3.01, 4), (N - 0.5, N)):
        assert kept_size(s, N) == kept
    assert consolidated(torch.tensor(1.0), N) == N


def _wide(W, seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(4, W), nn.ReLU(), nn.Linear(W, 2))
    return m, (torch.randn(3, 4),)


def test_set_sizes_on_a_wide_group_keeps_n():
    torch.set_num_threads(1)
    W, n = 40000, 20043
    m, inputs = _wide(W)
    dm = dcopt.convert(m, inputs)
    (g,) = dm.group_names
    dm.set_sizes({g: n})
    assert dm.kept_sizes() == [n]
    assert dm.sizes()[g].kept == n
    kept = dm.complexity("kept")
    assert round(kept.macs.item()) * W == kept.macs_full * n   # every MAC scales with the one group
    small = assert_exact_export(dm, inputs, others=[(torch.randn(5, 4),)])
    assert small[0].out_features == n
    # a state dict round trip keeps n
    dm2 = dcopt.convert(m, inputs)
    dm2.load_state_dict(dm.state_dict())
    assert dm2.kept_sizes() == [n]
    # export(sizes=) from the full model: slices to n, checked against the gated model at n
    dm3 = dcopt.convert(m, inputs)
    assert dcopt.export(dm3, sizes={g: 26631})[0].out_features == 26631
    assert dm3.kept_sizes() == [W]


def test_budget_landing_on_a_wide_group_keeps_what_it_reports():
    torch.set_num_threads(1)
    W, n = 53248, 26631
    m, inputs = _wide(W, seed=1)
    dm = dcopt.convert(m, inputs, target_macs=n / W)
    land = dcopt.land_on_budget(dm)
    assert land.met
    assert dm.kept_sizes() == list(land.after.values())
    assert dm.complexity("kept").macs_fraction.item() <= land.target * (1 + 1e-9)


def test_size_floor_is_a_size_the_model_keeps():
    """κ_min = 0.1 is 0.1 + 1.5e-9 in float32: on 700k features its clamp keeps 70001, so
    70000 is refused instead of silently keeping 70001."""
    W = 700000
    m, inputs = _wide(W)
    dm = dcopt.convert(m, inputs, kappa_min=0.1)
    (g,) = dm.group_names
    lo = dm.size_floor(g)
    assert lo == 70001
    with pytest.raises(ValueError):
        dm.set_sizes({g: lo - 1})
    dm.set_sizes({g: lo})
    assert dm.kept_sizes() == [lo]
    assert dcopt.export(dm)[0].out_features == lo


@pytest.mark.parametrize("bad, error", [({"0": 9, "2": 999}, ValueError), ({"0": 7, "nope": 3}, KeyError),
                                        ({"0": 9, "2": 2.5}, ValueError)])
def test_refused_set_sizes_changes_nothing(bad, error):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 20), nn.ReLU(), nn.Linear(20, 12), nn.ReLU(), nn.Linear(12, 2))
    inputs = (torch.randn(3, 6),)
    dm = dcopt.convert(m, inputs, kappa_min=0.25)
    dm.set_sizes({"0": 15, "2": 10})
    before = [k.detach().clone() for k in dm.size_parameters()]
    with pytest.raises(error):
        dm.set_sizes(bad)
    assert all(torch.equal(a, b) for a, b in zip(before, dm.size_parameters()))
    assert dm.kept_sizes() == [15, 10]
    assert_exact_export(dm, inputs, {"0": 5, "2": 3}, others=[(torch.randn(4, 6),)])
