"""Measuring, converting lazily and casting leave models as a user expects (a second
red-team pass: each test failed before its fix)."""
import pytest
import torch
from torch import nn

import dcopt
import dcopt.save as save


def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 5))


def _data():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 3, 8, 8, generator=g), torch.randn(8, 5, generator=g)) for _ in range(3)]


def test_count_macs_leaves_batchnorm_statistics_and_flags_alone():
    model = _bn_net().train()
    model[2].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert dcopt.count_macs(model, (torch.randn(4, 3, 8, 8),)) > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [m.training for m in model] == [True, True, False, True, True]


def test_lazy_fit_trains_batchnorm_as_eager_and_plain_training_do():
    data = _data()
    states = []
    for dm in (dcopt.convert(_bn_net(), (data[0][0],)), dcopt.convert(_bn_net())):
        dcopt.fit(dm, data, nn.functional.mse_loss, fixed_epochs=1, optimize_epochs=0, progress=False)
        states.append(dm.state_dict())
    eager, lazy = states
    assert lazy["gm.1.num_batches_tracked"].item() == eager["gm.1.num_batches_tracked"].item() == len(data)
    assert torch.equal(lazy["gm.1.running_mean"], eager["gm.1.running_mean"])


def test_lazy_fit_on_no_data_says_so():
    with pytest.raises(ValueError, match="no batches"):
        dcopt.fit(dcopt.convert(_bn_net()), [], nn.functional.mse_loss, fixed_epochs=1, optimize_epochs=0,
                  progress=False)


@pytest.mark.parametrize("cast", ["double", "half"])
def test_export_and_reorder_after_casting_the_dynamic_model(cast):
    torch.manual_seed(0)
    x = torch.randn(8, 16)
    dm = getattr(dcopt.convert(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), (x,)), cast)()
    dm.set_sizes({"0": 10})
    dcopt.reorder_by_importance(dm)
    small = dcopt.export(dm)
    assert next(small.parameters()).dtype == getattr(torch, {"double": "float64", "half": "float16"}[cast])
    if cast == "double":
        x64 = torch.randn(5, 16, dtype=torch.float64)
        with torch.no_grad():
            assert torch.allclose(dm.eval()(x64), small.eval()(x64), rtol=1e-12, atol=1e-12)


def test_lazy_conversion_honours_a_cast_before_the_first_batch():
    dm = dcopt.convert(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))).to(torch.float64)
    out = dm(torch.randn(2, 16, dtype=torch.float64))
    assert out.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in dm.weight_parameters())


class _WithScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 4)
        self.register_buffer("scale", torch.arange(4.0) + 2, persistent=False)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x))) * self.scale


def test_save_keeps_a_non_persistent_buffer_and_removes_what_does_not_load(tmp_path, monkeypatch):
    x = torch.randn(4, 16)
    dm = dcopt.convert(_WithScale(), (x,))
    dm.set_sizes({"fc1": 8})
    small = dcopt.export(dm).eval()
    folder = dcopt.save_exported(small, tmp_path / "m", example_inputs=(x,))
    with torch.no_grad():
        assert torch.allclose(dcopt.load_exported(folder)(x), small(x))

    def cannot_load(folder):
        raise RuntimeError("Missing key(s) in state_dict")

    monkeypatch.setattr(save, "load_exported", cannot_load)
    with pytest.raises(dcopt.ExportError, match="loading it back failed"):
        dcopt.save_exported(small, tmp_path / "n", example_inputs=(x,))
    assert {p.name for p in (tmp_path / "n").iterdir()} == {"WHY.txt"}


def test_a_leaf_name_that_names_no_submodule_is_an_error():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(dcopt.TraceError, match="'nope'"):
        dcopt.convert(model, (torch.randn(2, 4),), leaf_modules=["nope"])
    assert dcopt.convert(model, (torch.randn(2, 4),), leaf_modules=["1"]) is not None


def test_budget_mode_without_an_optimize_phase_warns():
    data = _data()
    dm = dcopt.convert(_bn_net(), (data[0][0],), target_macs=0.3)
    with pytest.warns(UserWarning, match="optimize_epochs=0"):
        dcopt.fit(dm, data, nn.functional.mse_loss, fixed_epochs=1, optimize_epochs=0, progress=False)


class _AugmentedAlias(nn.Module):
    """``identity = h; h += ...``: eager PyTorch changes ``identity`` too, torch.fx's graph
    does not (it records ``h = h + ...``) — invisible in the graph, visible in the numbers."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = self.a(x)
        identity = h
        h += self.b(torch.relu(h))
        return self.c(identity)


def test_a_traced_graph_that_differs_from_the_model_is_refused_before_any_rewrite():
    with pytest.raises(dcopt.TraceError, match="does not compute what the model computes"):
        dcopt.convert(_AugmentedAlias(), (torch.randn(3, 4),))


def test_the_full_width_check_draws_the_same_random_numbers():
    class Noisy(nn.Module):          # randomness in eval mode: both runs share one seed
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.b(h + torch.rand_like(h))

    assert dcopt.convert(Noisy(), (torch.randn(3, 4),)) is not None   # no false TraceError
