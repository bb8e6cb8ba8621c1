"""fit and convert refuse what they cannot use with a clear error up front, instead of a raw
TypeError from deep inside (or a NaN loss after the fixed phase has spent its epochs).

Each test names the input that used to get through: an integer-valued float epoch count,
empty or one-shot ``val_data``, dict / tensor batches, NaN/inf float options, a non-scalar
loss, and budget mode on a model with no dynamic group."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import dcopt
from dcopt.train import fit

pytestmark = pytest.mark.usefixtures("one_thread")


def mse(out, y):
    return nn.functional.mse_loss(out, y)


def data(n=64, bs=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 8, generator=g), torch.randn(n, 2, generator=g)
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]


def mlp_dm(**options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    return dcopt.convert(model, (torch.randn(4, 8),), **options)


# -- epoch counts -----------------------------------------------------------------------

def test_integer_valued_float_epochs_run_as_ints():
    hist = fit(mlp_dm(), data(), mse, fixed_epochs=2.0, optimize_epochs=1.0, settle_epochs=1.0, progress=False)
    assert [(r.phase, r.phase_epoch) for r in hist.epochs] == [("fixed", 1), ("fixed", 2), ("optimize", 1),
                                                               ("settle", 1)]
    assert all(type(r.phase_epoch) is int for r in hist.epochs)


@pytest.mark.parametrize("bad", [2.5, -1, float("nan"), float("inf"), "2"])
@pytest.mark.parametrize("which", ["fixed_epochs", "optimize_epochs", "settle_epochs"])
def test_bad_epoch_counts_are_refused(which, bad):
    kw = dict(fixed_epochs=1, optimize_epochs=1, settle_epochs=0)
    kw[which] = bad
    with pytest.raises(ValueError, match=which):
        fit(mlp_dm(), data(), mse, progress=False, **kw)


# -- val_data ---------------------------------------------------------------------------

@pytest.mark.parametrize("tolerance,fixed", [(None, 1), (0.05, 2), (0.05, 0)])
def test_empty_val_data_is_an_error(tolerance, fixed):
    with pytest.raises(ValueError, match="val_data yielded no batches"):
        fit(mlp_dm(), data(), mse, fixed_epochs=fixed, optimize_epochs=1, tolerance=tolerance, val_data=[],
            progress=False)


@pytest.mark.parametrize("tolerance", [None, 0.05])
def test_one_shot_val_data_is_refused_like_train_data(tolerance):
    with pytest.raises(ValueError, match="val_data must be re-iterable"):
        fit(mlp_dm(), data(), mse, fixed_epochs=2, optimize_epochs=2, tolerance=tolerance,
            val_data=(b for b in data(seed=1)), progress=False)
    with pytest.raises(ValueError, match="train_data must be re-iterable"):
        fit(mlp_dm(), iter(data()), mse, fixed_epochs=2, optimize_epochs=2, progress=False)


def test_reiterable_val_data_records_every_epoch():
    hist = fit(mlp_dm(), data(), mse, fixed_epochs=1, optimize_epochs=2, val_data=data(seed=1), progress=False)
    assert all(r.val_loss is not None and math.isfinite(r.val_loss) for r in hist.epochs)


# -- batch form -------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda x, y: {"x": x, "y": y},                 # unpacked into its two key strings
    lambda x, y: {"x": x, "y": y, "z": y},
    lambda x, y: torch.stack([x[:, :2], y]),        # a tensor of 2 rows unpacks into its rows
    lambda x, y: ("x", y),                          # inputs not tensors
    lambda x, y: ((x, {"mask": x}), y),
])
def test_batches_not_pairs_of_tensor_inputs_are_a_clear_type_error(make):
    batches = [make(x, y) for x, y in data()]
    with pytest.raises(TypeError, match="each batch must be a pair"):
        fit(mlp_dm(), batches, mse, fixed_epochs=1, optimize_epochs=1, progress=False)
    with pytest.raises(TypeError, match="each batch must be a pair"):  # val_data reads batches the same way
        fit(mlp_dm(), data(), mse, fixed_epochs=1, optimize_epochs=0, val_data=batches, progress=False)


def test_list_and_tuple_inputs_still_work():
    batches = [([x], y) for x, y in data()] + [((x,), y) for x, y in data()]
    assert len(fit(mlp_dm(), batches, mse, fixed_epochs=1, optimize_epochs=1, progress=False)) == 2


@pytest.mark.parametrize("loss", [lambda o, t: mse(o, t).item(),
                                  lambda o, t: nn.functional.mse_loss(o, t, reduction="none")])
def test_non_scalar_loss_is_a_clear_type_error(loss):
    with pytest.raises(TypeError, match="loss_fn must return"):
        fit(mlp_dm(), data(), loss, fixed_epochs=1, optimize_epochs=1, progress=False)


# -- finite float options ---------------------------------------------------------------

@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("name,extra", [("beta", {}), ("dual_lr", {"target_macs": 0.5}),
                                        ("budget_rho", {"target_macs": 0.5}), ("kappa_min", {}),
                                        ("target_macs", {})])
def test_non_finite_config_options_fail_at_convert(name, extra, value):
    with pytest.raises(ValueError, match=name):
        mlp_dm(**{name: value, **extra})
    with pytest.raises(ValueError, match=name):
        dcopt.Config(**{name: value, **extra})


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", ["lr", "size_lr", "settle_lr", "cross_epochs"])
def test_non_finite_fit_rates_are_refused_before_training(name, value):
    dm = mlp_dm()
    before = [p.detach().clone() for p in dm.parameters()]
    with pytest.raises(ValueError, match=name):
        fit(dm, data(), mse, fixed_epochs=1, optimize_epochs=1, settle_epochs=1, tolerance=0.05, progress=False,
            **{name: value})
    assert all(torch.equal(b, p) for b, p in zip(before, dm.parameters()))  # nothing trained


# -- budget mode without a dynamic group ------------------------------------------------

def test_budget_mode_without_dynamic_groups_says_so():
    torch.manual_seed(0)
    dm = dcopt.convert(nn.Sequential(nn.Linear(8, 2)), (torch.randn(4, 8),), target_macs=0.5)
    assert not dm.group_names
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hist = fit(dm, data(), mse, fixed_epochs=1, optimize_epochs=2, progress=False)
    texts = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any("no dynamic group" in t for t in texts), texts
    assert not any("kappa_min floor" in t for t in texts), texts
    assert hist.budget_landing is not None and not hist.budget_landing.met
    assert hist.final_sizes == {}


def test_a_reorder_name_that_names_no_group_fails_before_training():
    """It raised from reorder_by_importance, after the whole fixed phase had run."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    dm = dcopt.convert(model, (torch.randn(2, 4),))
    data = [(torch.randn(4, 4), torch.randn(4, 2))]
    seen = []
    with pytest.raises(KeyError, match="nope"):
        dcopt.fit(dm, data, lambda out, y: seen.append(1) or F.mse_loss(out, y), fixed_epochs=1,
                  optimize_epochs=1, reorder=["nope"])
    assert not seen


def test_tolerance_controller_options_must_be_finite():
    from dcopt.tolerance import ToleranceController
    for name in ("rate", "calibration_noise", "max_violation", "beta_init"):
        with pytest.raises(ValueError, match=name):
            ToleranceController(0.02, **{name: float("inf")})
