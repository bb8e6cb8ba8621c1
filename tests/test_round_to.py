"""convert(..., round_to=k): kept widths are multiples of k (at most N) everywhere an
integer size is taken, so the eval-mode DynamicModel still equals its export."""
import random

import pytest
import torch

import dcopt
from checks import assert_exact_export
from models import build


def _widths_ok(dm, k):
    for info in dm.sizes().values():
        assert info.kept == info.width or info.kept % k == 0, info
        assert info.kept >= min(info.width, info.s - 1e-3)


@pytest.mark.parametrize("name", ["mlp", "conv_bn_flatten", "crnn_gru", "residual", "dense_concat", "sliced"])
def test_rounded_sizes_eval_equals_export(name):
    model, inputs = build(name)
    dm = dcopt.convert(model, inputs, round_to=4)
    rng = random.Random(1)
    for _ in range(4):
        with torch.no_grad():
            for g, k in zip(dm.plan.groups, dm.size_parameters()):
                k.fill_(rng.uniform(0.2, 1.0))  # continuous sizes, not integers
        _widths_ok(dm, 4)
        assert_exact_export(dm, inputs)   # continuous sizes, so no set_sizes


def test_round_to_on_a_linear_layer_and_explicit_sizes():
    model, inputs = build("mlp")
    dm = dcopt.convert(model, inputs, round_to=8)
    name = dm.plan.groups[0].name
    width = dm.plan.groups[0].width
    assert width > 8
    with torch.no_grad():
        next(dm.size_parameters()).fill_(3.5 / width)
    assert dm.sizes()[name].kept == 8
    small = dcopt.export(dm)
    assert getattr(small, name).out_features == 8
    small = dcopt.export(dm, sizes={name: 5})       # explicit sizes are rounded too
    assert getattr(small, name).out_features == 8
    small = dcopt.export(dm, sizes={name: width})   # never above N
    assert getattr(small, name).out_features == width


def test_round_to_default_is_ceil_and_is_validated():
    model, inputs = build("mlp")
    dm = dcopt.convert(model, inputs)
    name = dm.plan.groups[0].name
    with torch.no_grad():
        next(dm.size_parameters()).fill_(3.5 / dm.plan.groups[0].width)
    assert dm.sizes()[name].kept == 4
    for bad in (0, -8, 2.5, True):
        with pytest.raises(ValueError, match="round_to"):
            dcopt.convert(model, inputs, round_to=bad)
