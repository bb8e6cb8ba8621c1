"""BatchNorm folding at export (``dcopt.fold``, ``export(..., fold_batchnorm=True)``):
folded where exact, left alone where not, and the result equals the unfolded model."""
import copy
import importlib
import random

import pytest
import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

import dcopt
from dcopt.numcheck import max_relative_error
from dcopt.fold import fold_batchnorm
from models import build, _randomize_norm_stats


def _bns(model):
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _numel(model, which=None):
    """Parameter count: all, the conv/Linear biases ("bias"), or the BatchNorms' ("bn")."""
    if which == "bias":
        return sum(m.bias.numel() for m in model.modules()
                   if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and m.bias is not None)
    if which == "bn":
        return sum(p.numel() for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                   for p in m.parameters())
    return sum(p.numel() for p in model.parameters())


def _fold(model, x):
    _randomize_norm_stats(model)
    model.eval()
    gm = torch.fx.symbolic_trace(copy.deepcopy(model)).eval()
    folded = fold_batchnorm(gm, (x,))
    with torch.no_grad():
        err = max_relative_error(model(x), gm(x))
    return gm, folded, err


class Seq(nn.Module):
    def __init__(self, *layers):
        super().__init__()
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("layers,x", [
    ((nn.Conv1d(3, 6, 3), nn.BatchNorm1d(6), nn.ReLU()), torch.randn(2, 3, 9)),
    ((nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6)), torch.randn(2, 3, 7, 7)),
    ((nn.Conv3d(3, 6, 2), nn.BatchNorm3d(6)), torch.randn(2, 3, 4, 4, 4)),
    ((nn.ConvTranspose1d(3, 6, 3, stride=2), nn.BatchNorm1d(6)), torch.randn(2, 3, 5)),
    ((nn.ConvTranspose2d(4, 6, 3, bias=False), nn.BatchNorm2d(6)), torch.randn(2, 4, 5, 5)),
    ((nn.ConvTranspose3d(3, 6, 2), nn.BatchNorm3d(6)), torch.randn(2, 3, 3, 3, 3)),
    ((nn.Conv2d(4, 6, 3, groups=2), nn.BatchNorm2d(6)), torch.randn(2, 4, 5, 5)),
    ((nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh()), torch.randn(4, 5)),
    ((nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6, affine=False)), torch.randn(2, 3, 7, 7)),
])
def test_each_pair_kind_folds_exactly(layers, x):
    torch.manual_seed(0)
    gm, folded, err = _fold(Seq(*layers), x)
    assert folded == [("body.0", "body.1")]
    assert _bns(gm) == 0
    assert err < 1e-5


def test_a_chain_of_batchnorms_after_one_conv_folds_entirely():
    torch.manual_seed(0)
    gm, folded, err = _fold(Seq(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.BatchNorm2d(6), nn.ReLU()),
                            torch.randn(2, 3, 7, 7))
    assert folded == [("body.0", "body.1"), ("body.0", "body.2")] and _bns(gm) == 0
    assert err < 1e-5


class ConvUsedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


class SharedBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.a(x)) + self.bn(self.b(x))


class WeightReadDirectly(nn.Module):
    """The conv's weight is also read in the forward (a weight-norm-like penalty): folding
    the conv would change that value."""
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) * self.conv.weight.sum()


class LinearOverTime(nn.Module):
    """Linear on (N, L, C) with L == C: BatchNorm1d normalises L, not the Linear's features."""
    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(4, 6), nn.BatchNorm1d(6)

    def forward(self, x):
        return self.bn(self.fc(x))


@pytest.mark.parametrize("model,x", [
    (ConvUsedTwice(), torch.randn(2, 3, 5, 5)),
    (SharedConv(), torch.randn(2, 3, 5, 5)),
    (WeightReadDirectly(), torch.randn(2, 3, 5, 5)),
    (LinearOverTime(), torch.randn(2, 6, 4)),
    (Seq(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6, track_running_stats=False)), torch.randn(2, 3, 7, 7)),
    (Seq(nn.Conv1d(3, 6, 3), nn.BatchNorm1d(6)), torch.randn(3, 8)),           # unbatched conv
    (Seq(nn.ConvTranspose2d(4, 6, 3, groups=2), nn.BatchNorm2d(6)), torch.randn(2, 4, 5, 5)),   # grouped transposed
])
def test_pairs_that_cannot_fold_exactly_are_left_alone(model, x):
    torch.manual_seed(0)
    gm, folded, err = _fold(model, x)
    assert folded == []
    assert err == 0.0


def test_a_shared_batchnorm_is_left_alone():
    torch.manual_seed(0)
    gm, folded, err = _fold(SharedBN(), torch.randn(2, 3, 5, 5))
    assert folded == [] and err == 0.0


def test_the_shape_check_is_what_keeps_linear_over_time_exact():
    """torch's own fuse folds this pair (L happens to equal the features) and is wrong."""
    torch.manual_seed(0)
    model, x = LinearOverTime(), torch.randn(2, 6, 4)
    _randomize_norm_stats(model)
    model.eval()
    with torch.no_grad():
        assert max_relative_error(model(x), fuse(model)(x)) > 1e-3


def test_fold_refuses_a_training_model():
    gm = torch.fx.symbolic_trace(Seq(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)))
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(gm, (torch.randn(2, 3, 7, 7),))


@pytest.mark.parametrize("name", ["conv_bn_flatten", "residual", "depthwise_separable", "crnn_gru"])
def test_export_with_fold_equals_the_gated_model(name):
    model, inputs = build(name)
    dm = dcopt.convert(model, inputs)
    rng = random.Random(1)
    for _ in range(3):
        dm.set_sizes({g.name: rng.randint(1, g.width) for g in dm.plan.groups})
        plain = dcopt.export(dm)
        small = dcopt.export(dm, fold_batchnorm=True)
        assert _bns(plain) > 0 and _bns(small) < _bns(plain)
        assert isinstance(small, torch.fx.GraphModule) and not small.training
        dm.eval()
        other = tuple(torch.randn_like(t) if t.is_floating_point() else t for t in inputs)
        with torch.no_grad():
            for xs in (inputs, other):
                assert max_relative_error(dm(*xs), small(*xs)) < 1e-5
        assert dcopt.count_macs(small, inputs) == dcopt.count_macs(plain, inputs)   # BatchNorm costs no MACs
        # folding changes no weight's shape: only BatchNorm parameters go, biases may come
        assert _numel(small) - _numel(small, "bias") - _numel(small, "bn") \
            == _numel(plain) - _numel(plain, "bias") - _numel(plain, "bn")
        assert _numel(small, "bn") < _numel(plain, "bn")


def test_export_without_fold_keeps_batchnorm_and_the_user_class():
    model, inputs = build("conv_bn_flatten")
    dm = dcopt.convert(model, inputs)
    small = dcopt.export(dm)
    assert type(small) is type(model) and _bns(small) == _bns(model)


def test_a_folded_export_saves_and_loads_with_torch_alone(tmp_path):
    model, inputs = build("residual")
    dm = dcopt.convert(model, inputs)
    dm.set_sizes({g.name: max(1, g.width // 2) for g in dm.plan.groups})
    small = dcopt.export(dm, fold_batchnorm=True)
    assert _bns(small) < _bns(dcopt.export(dm))
    dcopt.save_exported(small, tmp_path / "m", example_inputs=inputs)
    assert (tmp_path / "m" / "model.pt2").exists()
    program = torch.export.load(tmp_path / "m" / "model.pt2").module()
    loaded = dcopt.load_exported(tmp_path / "m").eval()
    with torch.no_grad():
        want = dm.eval()(*inputs)
        assert max_relative_error(want, loaded(*inputs)) < 1e-5 and max_relative_error(want, program(*inputs)) < 1e-5


def test_export_folds_batchnorm_after_a_transposed_convolution():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.ConvTranspose2d(8, 6, 2, stride=2), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 2, 1))
    _randomize_norm_stats(model)
    model.eval()
    x = torch.randn(2, 3, 5, 5)
    dm = dcopt.convert(model, (x,))
    assert len(dm.plan.groups) == 2
    dm.set_sizes({g.name: 3 for g in dm.plan.groups})
    small = dcopt.export(dm, fold_batchnorm=True)
    assert _bns(small) == 0
    assert [m.out_channels for m in small.modules() if isinstance(m, nn.modules.conv._ConvNd)] == [3, 3, 2]
    with torch.no_grad():
        assert max_relative_error(dm.eval()(x), small(x)) < 1e-5


def test_export_checks_the_fold_by_numbers(monkeypatch):
    """A fold that changed the numbers (simulated: a folded weight nudged) is caught by
    export's own check, which compares with the unfolded export, not passed on."""
    ex = importlib.import_module("dcopt.export")   # dcopt.export is also the function
    model, inputs = build("conv_bn_flatten")
    dm = dcopt.convert(model, inputs)

    def bad_fold(gm, example_inputs):
        done = fold_batchnorm(gm, example_inputs)
        with torch.no_grad():
            gm.get_submodule(done[0][0]).weight.mul_(1.01)
        return done

    monkeypatch.setattr(ex, "fold", bad_fold)
    with pytest.raises(dcopt.ExportError, match="folding BatchNorm changed"):
        dcopt.export(dm, fold_batchnorm=True)
    assert dcopt.export(dm, fold_batchnorm=True, verify=False) is not None


def test_an_inference_export_is_in_eval_mode_even_with_nothing_to_fold():
    """fold_batchnorm=True after fit (train mode) returned a train-mode model when no
    BatchNorm could be folded (BN after an activation, as in x-vector/TDNN): its
    BatchNorms then used batch statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 16, 3), nn.ReLU(), nn.BatchNorm1d(16), nn.Conv1d(16, 4, 1))
    x = torch.randn(4, 3, 20)
    dm = dcopt.convert(model, (x,))
    dm.train()
    small = dcopt.export(dm, fold_batchnorm=True)
    assert not small.training
    torch.testing.assert_close(small(x), dm.eval()(x))
