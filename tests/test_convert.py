"""Conversion: the gated model, its phases, sizes, gradients and state."""
import copy
import math
import pickle

import pytest
import torch
import torchvision
from torch import nn

import dcopt
from dcopt.gates import FeatureGate
from models import build


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["mlp", "crnn_gru", "residual"])
def test_fixed_phase_equals_original_and_user_model_untouched(name):
    model, inputs = build(name)
    before = state(model)
    tree = repr(model)
    dm = dcopt.convert(model, inputs)
    after = state(model)
    assert repr(model) == tree and before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert dm.phase == "fixed"
    for mode in ("eval", "train"):
        getattr(model, mode)()
        getattr(dm, mode)()
        torch.manual_seed(1)
        a = model(*inputs)
        torch.manual_seed(1)
        b = dm(*inputs)
        assert torch.equal(a, b)


def test_fixed_phase_resnet18():
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    dm = dcopt.convert(model, (x,)).eval()
    assert torch.equal(model(x), dm(x))


def test_gate_noise_formula():
    """Clean below ⌊s⌋, sqrt(λ)·x + sqrt(1−λ)·σ·ν at ⌊s⌋, zero above; eval keeps ⌈s⌉ exactly."""
    n = 6
    gate = FeatureGate(1, torch.zeros(n, dtype=torch.long), torch.arange(n), [n])
    gate.noise = True
    x = torch.randn(4000, n) * torch.arange(1, n + 1)
    kappa = torch.tensor(3.25 / n)
    gate.train()
    y = gate(x, kappa)
    assert torch.equal(y[:, :3], x[:, :3]) and (y[:, 4:] == 0).all()
    lam = 0.001 + 0.998 * 0.25
    noise = y[:, 3] - lam ** 0.5 * x[:, 3]
    assert abs(noise.std().item() / (((1 - lam) ** 0.5) * x[:, 3].std().item()) - 1) < 0.05
    gate.eval()
    y = gate(x, kappa)
    assert torch.equal(y[:, :4], x[:, :4]) and (y[:, 4:] == 0).all()


def test_gate_zeroes_inf_in_removed_features():
    gate = FeatureGate(1, torch.zeros(3, dtype=torch.long), torch.arange(3), [3]).eval()
    x = torch.tensor([[1.0, 2.0, float("inf")]])
    assert torch.equal(gate(x, torch.tensor(2 / 3)), torch.tensor([[1.0, 2.0, 0.0]]))


def test_task_gradient_reaches_every_size_and_stays_finite():
    model, inputs = build("crnn_gru")
    dm = dcopt.convert(model, inputs).optimize_sizes().train()
    torch.manual_seed(0)
    out = dm(*inputs)
    out.pow(2).mean().backward()
    grads = [k.grad for k in dm.size_parameters()]
    assert len(grads) == 2 and all(g is not None and torch.isfinite(g) and g != 0 for g in grads)


def test_no_nan_with_aggressive_size_learning_rate():
    torch.manual_seed(0)
    model, inputs = build("mlp")
    model.train()
    dm = dcopt.convert(model, inputs, kappa_min=0.05, beta=5.0).optimize_sizes().train()
    opt = torch.optim.SGD([{"params": list(dm.weight_parameters()), "lr": 1e-3},
                           {"params": list(dm.size_parameters()), "lr": 1.0}])
    x = torch.randn(16, 16)
    y = torch.randn(16, 4)
    for step in range(2000):
        opt.zero_grad()
        loss = (dm(x) - y).pow(2).mean() + dm.complexity_loss()
        loss.backward()
        for k in dm.size_parameters():
            assert torch.isfinite(k.grad).all(), step
        opt.step()
        for k in dm.size_parameters():
            assert torch.isfinite(k).all()
    for k in dm.size_parameters():
        assert 0.05 <= float(k.detach().clamp(0.05, 1)) <= 1.0


def test_sizes_set_sizes_and_kept():
    model, inputs = build("mlp")
    dm = dcopt.convert(model, inputs)
    assert {n: (i.kept, i.width) for n, i in dm.sizes().items()} == {"fc1": (32, 32), "fc2": (24, 24)}
    dm.set_sizes({"fc1": 7})
    info = dm.sizes()["fc1"]
    assert info.kept == 7 and abs(info.s - 7) < 1e-4 and abs(info.kappa - 7 / 32) < 1e-6
    with pytest.raises(KeyError):
        dm.set_sizes({"nope": 3})
    with pytest.raises(ValueError):
        dm.set_sizes({"fc1": 0})


def test_complexity_is_differentiable_and_exact_at_integers():
    model, inputs = build("mlp")
    dm = dcopt.convert(model, inputs)
    dm.set_sizes({"fc1": 10, "fc2": 5})
    c = dm.complexity("kept")
    assert c.macs.item() == 4 * (16 * 10 + 10 * 5 + 5 * 4)
    assert c.params.item() == (16 * 10 + 10) + (10 * 5 + 5) + (5 * 4 + 4)
    dm.optimize_sizes()
    c = dm.complexity("current")
    c.macs.backward()
    assert all(k.grad is not None and k.grad > 0 for k in dm.size_parameters())


def test_regularizers():
    model, inputs = build("mlp")
    dm = dcopt.convert(model, inputs, beta=2.0)
    assert dm.complexity_loss().item() == pytest.approx(2.0)  # (β/G)·Σκ² at κ = 1
    dm2 = dcopt.convert(model, inputs, beta=3.0, regularizer="macs")
    dm2.set_sizes({"fc1": 16})
    assert dm2.complexity_loss().item() == pytest.approx(3.0 * dm2.complexity().macs_fraction.item(), rel=1e-6)
    with pytest.raises(ValueError):
        dcopt.convert(model, inputs, regularizer="l1")
    with pytest.raises(ValueError):
        dcopt.convert(model, inputs, target_macs=1.5)


def test_strict_raises_conversion_error_with_rejections():
    model = nn.Sequential(nn.Linear(4, 8), nn.GroupNorm(2, 8), nn.Linear(8, 2))
    with pytest.raises(dcopt.ConversionError) as info:
        dcopt.convert(model, (torch.randn(2, 4),), strict=True)
    assert info.value.rejections and "GroupNorm" in str(info.value)


def test_state_dict_round_trip_and_pickle_and_dtype():
    model, inputs = build("crnn_gru")
    dm = dcopt.convert(model, inputs)
    dm.set_sizes({"rnn": 5, "conv": 9})
    dm.optimize_sizes()
    sd = dm.state_dict()
    fresh = dcopt.convert(model, inputs)
    fresh.load_state_dict(sd)
    assert fresh.phase == "optimize"
    assert fresh.kept_sizes() == dm.kept_sizes()
    assert torch.equal(fresh.eval()(*inputs), dm.eval()(*inputs))
    clone = pickle.loads(pickle.dumps(dm))
    assert torch.equal(clone.eval()(*inputs), dm(*inputs))
    d64 = copy.deepcopy(dm).to(torch.float64)
    out = d64(*(x.double() for x in inputs))
    assert out.dtype == torch.float64
    assert torch.allclose(out.float(), dm(*inputs), atol=1e-5)


def test_a_state_loaded_under_other_sizing_options_warns_when_its_widths_change():
    """round_to and kappa_min decide the kept sizes; the state records them, and loading it
    into a model whose options keep other widths says so (the options stay the model's)."""
    import warnings

    model, inputs = build("mlp")
    dm = dcopt.convert(model, inputs, round_to=8, kappa_min=0.05)
    dm.set_sizes({"fc1": 5})                                        # kept 8 under round_to=8
    sd = dm.state_dict()
    assert {k: sd["_extra_state"][k] for k in ("round_to", "kappa_min")} == {"round_to": 8, "kappa_min": 0.05}
    other = dcopt.convert(model, inputs, kappa_min=0.05)            # round_to=1: keeps 5
    with pytest.warns(UserWarning, match=r"round_to': 8.*'fc1': \(8, 5\)"):
        other.load_state_dict(sd)
    assert other.sizes()["fc1"].kept == 5
    same = dcopt.convert(model, inputs, round_to=8, kappa_min=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.load_state_dict(sd)                                    # same options: silent
        full = dcopt.convert(model, inputs, kappa_min=0.5)          # a full-width state: same widths under any κ_min
        full.load_state_dict(dcopt.convert(model, inputs).state_dict())
    assert same.kept_sizes() == dm.kept_sizes()


def test_a_lazily_converted_model_has_the_eager_state_keys():
    """convert(model) and convert(model, inputs) save and load the same state, so a model
    converted lazily can be exported by the CLI (which converts eagerly)."""
    model, inputs = build("mlp")
    lazy = dcopt.convert(model)
    with pytest.raises(RuntimeError, match="first forward"):
        lazy.state_dict()
    lazy(*inputs)
    lazy.set_sizes({"fc1": 7})
    eager = dcopt.convert(model, inputs)
    assert lazy.state_dict().keys() == eager.state_dict().keys()
    eager.load_state_dict(lazy.state_dict())
    assert eager.kept_sizes() == lazy.kept_sizes()
    eager.set_sizes({"fc1": 5})
    lazy.load_state_dict(eager.state_dict())
    assert lazy.sizes()["fc1"].kept == 5


def test_lazy_convert_settles_on_first_forward():
    model, inputs = build("mlp")
    dm = dcopt.convert(model)
    with pytest.raises(AttributeError, match="first forward"):
        dm.sizes()
    out = dm(*inputs)
    assert torch.equal(out, model(*inputs))
    assert set(dm.sizes()) == {"fc1", "fc2"}
    small = dcopt.export(dm)
    assert torch.allclose(small(*inputs), out, atol=1e-6)


def test_sizes_below_the_kappa_min_floor_are_refused_not_silently_raised():
    """κ is clamped to κ_min, so size 1 of a 12-wide group with κ_min 0.125 would keep 2:
    set_sizes and export(sizes=...) refuse it and name the floor (export used to compare
    a 1-wide export with a 2-wide gated model and blame itself)."""
    from models import build
    model, inputs = build("conv_bn_flatten")
    dm = dcopt.convert(model, inputs)
    g = dm.plan.groups[0]
    floor = dm.size_floor(g.name)
    assert floor == math.ceil(0.125 * g.width) > 1
    with pytest.raises(ValueError, match="keeps at least"):
        dm.set_sizes({g.name: floor - 1})
    with pytest.raises(ValueError, match="keeps at least"):
        dcopt.export(dm, {g.name: floor - 1})
    with pytest.raises(ValueError, match="integer"):
        dm.set_sizes({g.name: 2.5})
    dm.set_sizes({g.name: floor})
    assert dm.sizes()[g.name].kept == floor
    small = dcopt.export(dm, {g.name: floor})
    assert sum(isinstance(m, torch.nn.Conv2d) and m.out_channels == floor for m in small.modules()) == 1
    low = dcopt.convert(model, inputs, kappa_min=1e-3)
    low.set_sizes({g.name: 1})
    assert low.sizes()[g.name].kept == 1
    dcopt.export(low, {g.name: 1})


def test_example_inputs_given_as_a_dict_are_refused_with_the_way_out():
    """A dict was read as ``tuple(d)``, its keys, and the model failed on a string."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    for call in (dcopt.convert, dcopt.analyze):
        with pytest.raises(TypeError, match=r"positional arguments: pass a tuple such as \(x,\)"):
            call(model, {"x": torch.randn(2, 4)})


def test_count_macs_takes_a_bare_tensor():
    """A bare tensor was iterated over as rows: 'forward() takes 2 positional arguments'."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    assert dcopt.count_macs(model, x) == dcopt.count_macs(model, (x,)) == 3 * (4 * 8 + 8 * 2)


class OptionalMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x, mask=None):
        h = self.a(x)
        if mask is not None:
            h = h * mask.unsqueeze(-1)
        return self.b(h)


def test_an_argument_left_at_none_names_concrete_args():
    x = torch.randn(2, 5, 4)
    with pytest.raises(dcopt.TraceError, match=r"concrete_args=\{'mask': None\}"):
        dcopt.convert(OptionalMask(), (x,))
    dm = dcopt.convert(OptionalMask(), (x,), concrete_args={"mask": None})
    assert [g.name for g in dm.analysis.dynamic_groups] == ["a"]
