"""dcopt.reorder: permuting a group's features by importance is the same function, puts the
important features first, carries the optimizer's state along, and refuses what it cannot
permute."""
from __future__ import annotations

import copy
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import dcopt
from dcopt.numcheck import max_relative_error
from dcopt.reorder import ReorderError, magnitude_importance, reorder_by_importance
from models import CASES, build
from test_property import _assert_close, arch_spec
from test_property import build as build_arch

pytestmark = pytest.mark.usefixtures("one_thread")


def _out(dm, x):
    dm.eval()
    with torch.no_grad():
        return dm(*x)


@pytest.mark.parametrize("name", sorted(CASES))
def test_reorder_keeps_the_function_and_export_stays_exact(name):
    model, x = build(name)
    dm = dcopt.convert(model, x)
    before = _out(dm, x)
    importance = {g.name: torch.randn(g.width) for g in dm.plan.groups}
    r = reorder_by_importance(dm, importance=importance)
    assert max_relative_error(before, _out(dm, x)) <= 1e-5
    for name_, perm in r.perms.items():
        assert sorted(perm) == list(range(len(perm)))
        assert perm == torch.argsort(-importance[name_], stable=True).tolist()
    assert set(r.perms) | set(r.skipped) == set(dm.group_names)
    # every size still exports exactly (export checks the numbers itself)
    dcopt.export(dm, {g.name: max(dm.size_floor(g.name), g.width // 3) for g in dm.plan.groups})


class Planted(nn.Module):
    """fc1's 16 features of which only 5, at scattered positions, carry anything."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.bn = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 3)
        self.useful = [1, 4, 9, 12, 15]
        dead = [i for i in range(16) if i not in self.useful]
        with torch.no_grad():
            self.fc1.weight[dead] = 0.0
            self.fc1.bias[dead] = 0.0
            self.bn.weight[dead] = 0.0
            self.bn.bias[dead] = 0.0
            self.fc2.weight[:, dead] = 0.0

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def test_magnitude_puts_the_planted_features_first():
    torch.manual_seed(0)
    model = Planted()
    x = (torch.randn(8, 6),)
    dm = dcopt.convert(model, x)
    full = _out(dm, x)
    scores = magnitude_importance(dm)["fc1"]
    assert set(torch.argsort(-scores)[:5].tolist()) == set(model.useful)
    # before reordering, keeping the first 5 features loses the planted ones; after, nothing
    cut_before = dcopt.export(dm, {"fc1": 5}).eval()
    with torch.no_grad():
        assert max_relative_error(full, cut_before(*x)) > 1e-2
    r = reorder_by_importance(dm)
    assert sorted(r.perms["fc1"][:5]) == model.useful
    cut_after = dcopt.export(dm, {"fc1": 5}).eval()
    with torch.no_grad():
        assert max_relative_error(full, cut_after(*x)) <= 1e-5
    assert model.fc1.weight[0].abs().sum() == 0   # the user's model is untouched


def _step(dm, opt, x, y):
    dm.train()
    opt.zero_grad()
    nn.functional.mse_loss(dm(*x), y).backward()
    opt.step()


@pytest.mark.parametrize("name", ["conv_bn_flatten", "crnn_gru", "dense_concat"])
def test_optimizer_state_follows_the_permutation(name):
    """Training then reordering == reordering (with the optimizer) then training: Adam's
    moments moved with their parameters."""
    model, x = build(name)
    model = model.double()
    x = tuple(t.double() if t.is_floating_point() else t for t in x)
    dm_a = dcopt.convert(model, x)
    dm_b = copy.deepcopy(dm_a)
    with torch.no_grad():
        y = torch.randn_like(_out(dm_a, x))
    opt_a = torch.optim.Adam(dm_a.weight_parameters(), lr=1e-2)
    opt_b = torch.optim.Adam(dm_b.weight_parameters(), lr=1e-2)
    _step(dm_a, opt_a, x, y)
    _step(dm_b, opt_b, x, y)
    importance = {g.name: torch.randn(g.width) for g in dm_a.plan.groups}
    reorder_by_importance(dm_b, importance=importance, optimizer=opt_b)
    _step(dm_a, opt_a, x, y)
    _step(dm_b, opt_b, x, y)
    reorder_by_importance(dm_a, importance=importance)
    for (n, pa), (_, pb) in zip(dm_a.named_parameters(), dm_b.named_parameters()):
        torch.testing.assert_close(pa, pb, msg=n)
    for (n, ba), (_, bb) in zip(dm_a.named_buffers(), dm_b.named_buffers()):
        torch.testing.assert_close(ba, bb, msg=n)


def test_groups_it_cannot_reorder_are_skipped_with_a_reason():
    model, x = build("sliced")
    dm = dcopt.convert(model, x)
    r = reorder_by_importance(dm)
    assert "slice" in r.skipped["fc1"]
    assert "fc1" not in r.perms
    model, x = build("mlp")
    dm = dcopt.convert(model, x)
    dm.set_sizes({"fc1": 10})
    r = reorder_by_importance(dm)
    assert "full width" in r.skipped["fc1"] and "fc1" not in r.perms
    assert "fc2" in r.perms
    r = reorder_by_importance(dm, groups=["fc2"])
    assert list(r.perms) == ["fc2"] and not r.skipped
    with pytest.raises(KeyError):
        reorder_by_importance(dm, groups=["nope"])


def test_a_wrong_permutation_is_caught_and_undone(monkeypatch):
    """A plan that misses a tensor (a dcopt bug) would permute producers but not consumers:
    the check raises and the model is left as it was."""
    model, x = build("conv_bn_flatten")
    dm = dcopt.convert(model, x)
    state = copy.deepcopy(dm.state_dict())
    plan = copy.copy(dm.plan)
    plan.params = {q: d for q, d in dm.plan.params.items() if not q.endswith("bn1.weight")}
    monkeypatch.setattr(type(dm), "plan", property(lambda self: plan))
    with pytest.raises(ReorderError):
        reorder_by_importance(dm, importance={g.name: torch.randn(g.width) for g in plan.groups})
    for k, v in dm.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, state[k]), k


def test_fit_reorders_at_the_start_of_the_optimize_phase():
    torch.manual_seed(0)
    model = Planted()
    x = torch.randn(64, 6)
    with torch.no_grad():
        y = model(x)
    data = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    dm = dcopt.convert(model, (x[:16],))
    hist = dcopt.fit(dm, data, nn.functional.mse_loss, fixed_epochs=1, optimize_epochs=1, progress=False,
                     reorder=True)
    assert sorted(hist.reordered["perms"]["fc1"]) == list(range(16))
    assert hist.reordered["max_error"] <= 1e-5
    assert dcopt.History.from_dict(hist.to_dict()).reordered == hist.reordered
    hist = dcopt.fit(dcopt.convert(model, (x[:16],)), data, nn.functional.mse_loss, fixed_epochs=1,
                     optimize_epochs=1, progress=False)
    assert hist.reordered is None


_widths = st.integers(2, 12)


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(c1=_widths, c2=_widths, h=_widths, seed=st.integers(0, 2 ** 16), data=st.data())
def test_random_permutations_of_a_conv_gru_model_are_exact(c1, c2, h, seed, data):
    torch.manual_seed(seed)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv1d(3, c1, 3, padding=1)
            self.bn1 = nn.BatchNorm1d(c1)
            self.conv2 = nn.Conv1d(c1, c2, 3, padding=1)
            self.gru = nn.GRU(c2, h, batch_first=True, bidirectional=True, num_layers=2)
            self.head = nn.Linear(2 * h, 2)

        def forward(self, x):
            z = torch.relu(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + 0.0
            out, _ = self.gru(z.transpose(1, 2))
            return self.head(out)

    model = M().double()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-0.5, 0.5)
        model.bn1.running_var.uniform_(0.5, 2.0)
    x = (torch.randn(2, 3, 7, dtype=torch.float64),)
    dm = dcopt.convert(model, x)
    before = _out(dm, x)
    importance = {g.name: torch.randn(g.width) for g in dm.plan.groups}
    r = reorder_by_importance(dm, importance=importance, tol=1e-9)
    assert set(r.perms) == set(dm.group_names)
    assert max_relative_error(before, _out(dm, x)) <= 1e-9
    sizes = {g.name: data.draw(st.integers(dm.size_floor(g.name), g.width)) for g in dm.plan.groups}
    dcopt.export(dm, sizes, tol=1e-9)


_N_ARCH = int(os.environ.get("DCOPT_REORDER_EXAMPLES", 60))


@settings(max_examples=_N_ARCH, deadline=None, derandomize=not os.environ.get("DCOPT_PROP_RANDOM"),
          suppress_health_check=[HealthCheck.too_slow])
@given(spec=arch_spec(), data=st.data())
def test_random_architectures_reorder_exactly(spec, data):
    """The property test's random architectures (residuals, cats, flattens, RNNs, slices,
    norms ...): any permutation leaves the full-width outputs as they were, and every size
    still exports exactly afterwards (export checks the numbers)."""
    model, inputs = build_arch(spec)
    try:
        dm = dcopt.convert(model, inputs, kappa_min=0.01)
    except dcopt.DcoptError:
        return
    if not dm.plan.groups:
        return
    before = _out(dm, inputs)
    importance = {g.name: torch.randn(g.width, generator=torch.Generator().manual_seed(i))
                  for i, g in enumerate(dm.plan.groups)}
    # reorder's own check runs (with its float64 second opinion: some drawn heads, e.g. a
    # mean over time after a LayerNorm over time, output rounding noise), and the outputs are
    # also compared as the property test compares (absolute below an output scale of 1)
    r = reorder_by_importance(dm, importance=importance)
    assert set(r.perms) | set(r.skipped) == set(dm.group_names)
    _assert_close(before, _out(dm, inputs), f"reordered ({r.perms}) vs before")
    sizes = {g.name: data.draw(st.integers(1, g.width), label=g.name) for g in dm.plan.groups}
    dm.set_sizes(sizes)
    small = dcopt.export(dm).eval()
    with torch.no_grad():
        _assert_close(_out(dm, inputs), small(*inputs), f"gated vs exported after reordering, sizes {sizes}")


def test_a_lazily_converted_model_reorders_after_its_first_forward():
    model, x = build("mlp")
    lazy = dcopt.convert(model)
    with pytest.raises(RuntimeError, match="first forward"):
        reorder_by_importance(lazy)
    lazy.eval()
    with torch.no_grad():
        before = lazy(*x)
        r = reorder_by_importance(lazy)
        assert set(r.perms) == {"fc1", "fc2"}
        assert max_relative_error(before, lazy(*x)) <= 1e-5


def test_a_factored_optimizer_state_is_refused_before_anything_moves():
    """Adafactor keeps row and column statistics, not one entry per weight: permuting the
    features would pair them with another feature's statistics. reorder refuses, naming
    the state, and leaves the model and the optimizer as they were."""
    model, x = build(sorted(CASES)[0])
    dm = dcopt.convert(model, x)
    with torch.no_grad():
        y = torch.randn_like(_out(dm, x))
    opt = torch.optim.Adafactor(dm.weight_parameters(), lr=1e-2)
    _step(dm, opt, x, y)
    before = {n: p.detach().clone() for n, p in dm.named_parameters()}
    state_before = {id(p): {k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for p, s in opt.state.items()}
    importance = {g.name: torch.randn(g.width) for g in dm.plan.groups}
    with pytest.raises(ValueError, match="Adafactor.*cannot permute"):
        reorder_by_importance(dm, importance=importance, optimizer=opt)
    for n, p in dm.named_parameters():
        assert torch.equal(p, before[n]), n
    for p, s in opt.state.items():
        for k, v in state_before[id(p)].items():
            assert torch.equal(s[k], v), k
    reorder_by_importance(dm, importance=importance)   # without the optimizer it still reorders


class _UnsavedBuffer(nn.Module):
    """A per-feature table registered with ``persistent=False`` (as rotary cos/sin caches
    are): reordering permutes it with the features, and the state dict leaves it out."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 8), nn.Linear(8, 2)
        self.register_buffer("table", torch.linspace(-1, 1, 8), persistent=False)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)) * self.table)


def test_a_reordered_state_carries_its_unsaved_buffers():
    torch.manual_seed(0)
    x = torch.randn(6, 5)
    dm = dcopt.convert(_UnsavedBuffer(), (x,))
    with torch.no_grad():
        dm.gm.a.weight.mul_(torch.arange(1.0, 9.0).flip(0)[:, None])   # an order to undo
    reorder_by_importance(dm)
    assert "table" not in dm.state_dict() and not torch.equal(dm.gm.table, torch.linspace(-1, 1, 8))
    again = dcopt.convert(_UnsavedBuffer(), (x,))
    again.load_state_dict(dm.state_dict())
    assert torch.equal(again.gm.table, dm.gm.table)
    assert max_relative_error(_out(dm, (x,)), _out(again, (x,))) == 0
