"""Gradients: the converted model must train what the user's model trains. torch.fx
records neither grad-mode switches (``torch.no_grad()`` inside forward) nor backward hooks,
so both used to be dropped silently: a frozen feature extractor got trained, a hook that
scales gradients did not run (found by a red-team pass)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dcopt
from checks import assert_exact_export
from dcopt.errors import TraceError


class FrozenExtractor(nn.Module):
    def __init__(self, switch):
        super().__init__()
        self.switch = switch
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 12)
        self.c = nn.Linear(12, 4)

    def forward(self, x):
        with self.switch():
            h = F.relu(self.a(x))
        return self.c(F.relu(self.b(h)))


@pytest.mark.parametrize("switch", [torch.no_grad, lambda: torch.set_grad_enabled(False), torch.inference_mode],
                         ids=["no_grad", "set_grad_enabled", "inference_mode"])
def test_a_frozen_block_is_refused_with_the_parameters_and_line(switch):
    x = torch.randn(3, 8)
    # inference_mode: the user's model itself cannot be trained (its tensors reach autograd)
    what = r"cannot be trained as it is" if switch is torch.inference_mode else r"a\.bias, a\.weight"
    with pytest.raises(TraceError, match=r"switches gradients off \(.*test_grad_mode.py:\d+\).*" + what):
        dcopt.convert(FrozenExtractor(switch), (x,))


def test_freezing_by_requires_grad_converts_and_stays_frozen():
    torch.manual_seed(0)
    model = FrozenExtractor(torch.enable_grad)
    model.a.requires_grad_(False)
    x = torch.randn(3, 8)
    dm = dcopt.convert(model, (x,))
    before = dm.gm.a.weight.detach().clone()
    dcopt.fit(dm, [(x, torch.zeros(3, 4))], lambda o, t: (o - t).pow(2).mean(), fixed_epochs=1,
              optimize_epochs=0, settle_epochs=0, progress=False)
    assert torch.equal(before, dm.gm.a.weight.detach())


class MaskUnderNoGrad(nn.Module):
    """no_grad around a computation no parameter takes part in: nothing changes."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.c = nn.Linear(16, 4)

    def forward(self, x):
        with torch.no_grad():
            mask = (x.abs().sum(-1, keepdim=True) > 1).to(x.dtype)
        return self.c(F.relu(self.a(x))) * mask


def test_no_grad_that_reaches_no_parameter_converts():
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    dm = dcopt.convert(MaskUnderNoGrad().eval(), (x,))
    assert [g.name for g in dm.analysis.dynamic_groups] == ["a"]
    assert_exact_export(dm, (x,), {"a": 5}, others=[(torch.randn(6, 8),)])


def test_a_frozen_block_made_a_leaf_converts():
    class Extractor(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 16)

        def forward(self, x):
            with torch.no_grad():
                return F.relu(self.a(x))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.ext = Extractor()
            self.b = nn.Linear(16, 12)
            self.c = nn.Linear(12, 4)

        def forward(self, x):
            return self.c(F.relu(self.b(self.ext(x))))

    x = torch.randn(3, 8)
    with pytest.raises(TraceError):
        dcopt.convert(Model(), (x,))
    dm = dcopt.convert(Model(), (x,), leaf_modules=["ext"])
    dm(x).sum().backward()
    assert dm.gm.ext.a.weight.grad is None and dm.gm.b.weight.grad is not None


def _two_layers():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


@pytest.mark.parametrize("kind", ["full", "pre", "deprecated", "parameter", "post_accumulate"])
def test_backward_hooks_are_refused(kind):
    model = _two_layers()
    hook = {
        "full": lambda: model[2].register_full_backward_hook(lambda m, gi, go: (gi[0] * 2,)),
        "pre": lambda: model[2].register_full_backward_pre_hook(lambda m, go: (go[0] * 2,)),
        "deprecated": lambda: model[0].register_backward_hook(lambda m, gi, go: None),
        "parameter": lambda: model[0].weight.register_hook(lambda g: g * 0),
        "post_accumulate": lambda: model[0].weight.register_post_accumulate_grad_hook(lambda p: None),
    }[kind]
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handle = hook()
    x = torch.randn(3, 4)
    with pytest.raises(TraceError, match="backward hooks are set on"):
        dcopt.convert(model, (x,))
    if kind == "deprecated":   # tracing with hooks allowed (to measure), but this one would trace forever
        from dcopt.trace import trace
        with pytest.raises(TraceError, match="endless loop"):
            trace(model, (x,), allow_hooks=True)
    handle.remove()
    dcopt.convert(model, (x,))


class ReturnsItsParameters(nn.Module):
    """A parameter of a dynamic width returned as it is (and inside a list): the user gets
    that tensor, so it keeps its shape and the groups it belongs to stay fixed."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a = nn.Linear(4, 8)
        self.shift = nn.Parameter(torch.zeros(8))
        self.b = nn.Linear(8, 6)
        self.c = nn.Linear(6, 2)

    def forward(self, x):
        y = self.c(F.relu(self.b(F.relu(self.a(x)) + self.shift)))
        return (y, self.shift) if self.how == "tuple" else {"y": y, "extra": [self.b.bias]}


@pytest.mark.parametrize("how", ["tuple", "dict"])
def test_a_returned_parameter_keeps_its_shape(how):
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    dm = dcopt.convert(ReturnsItsParameters(how).eval(), (x,))
    status = {g.name: g.status for g in dm.analysis.groups}
    fixed = "a" if how == "tuple" else "b"
    assert status[fixed] == "fixed"
    assert any("returned by the model as it is" in r for r in dm.analysis.group(fixed).reasons)
    other = "b" if how == "tuple" else "a"
    assert status[other] == "dynamic"
    assert_exact_export(dm, (x,), {other: 3}, others=[(torch.randn(5, 4),)])


class FrozenWrapped(nn.Module):
    """A GRU and a LayerNorm frozen by no_grad: dcopt wraps them (GatedRNN, MaskedNorm), so
    the gradient check must find their parameters under your names to see them frozen."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.rnn = nn.GRU(8, 10, batch_first=True)
        self.out = nn.Linear(10, 2)

    def forward(self, x):
        with torch.no_grad():
            h, _ = self.rnn(self.norm(self.a(x)))
        return self.out(h)


def test_frozen_wrapped_layers_are_named():
    with pytest.raises(TraceError, match=r"norm\.bias, norm\.weight, rnn\.bias_hh_l0 and 3 more"):
        dcopt.convert(FrozenWrapped(), (torch.randn(2, 5, 6),))
