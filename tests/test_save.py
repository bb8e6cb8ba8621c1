"""save_exported: what it leaves on disk is the model, or nothing that could be loaded."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dcopt
import dcopt.save as save


class _NoiseHead(nn.Module):
    """``mean(layer_norm(fc(x)))`` — 0 in exact arithmetic, float32 rounding noise in fact —
    and ``fc(x)`` beside it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 32)

    def forward(self, x):
        h = self.fc(x)
        return F.layer_norm(h, h.shape[-1:]).mean(-1), h


class _Reordered(_NoiseHead):
    """``_NoiseHead`` with its features stored in reverse order: the same function, but the
    mean sums them in another order."""

    def forward(self, x):
        noise, h = super().forward(x)
        return noise, h.flip(-1)


def _small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), (torch.randn(5, 4),)


def test_a_saved_model_that_differs_is_removed_and_reported(tmp_path, monkeypatch):
    model, x = _small()
    real = save._python_source

    def wrong_weights(m, name):
        text, state = real(m, name)
        state = dict(state)
        state["2.bias"] = state["2.bias"] + 1e-3     # a small fault in what is written
        return text, state

    monkeypatch.setattr(save, "_python_source", wrong_weights)
    with pytest.raises(dcopt.ExportError, match="does not reproduce the model.*__init__.py"):
        dcopt.save_exported(model, tmp_path / "m", example_inputs=x)
    left = {p.name for p in (tmp_path / "m").iterdir()}
    assert left == {"WHY.txt"}, left
    assert "nothing kept" in (tmp_path / "m" / "WHY.txt").read_text()


def test_saving_into_a_used_folder_leaves_no_file_of_the_earlier_model(tmp_path, monkeypatch):
    model, x = _small()
    folder = dcopt.save_exported(model, tmp_path / "m", example_inputs=x)
    assert (folder / "model.pt2").exists() and not (folder / "WHY.txt").exists()

    other = nn.Sequential(nn.Linear(4, 3))

    def no_export(*args, **kwargs):
        raise RuntimeError("cannot export this one")

    monkeypatch.setattr(torch.export, "export", no_export)
    dcopt.save_exported(other, folder, example_inputs=x)
    assert not (folder / "model.pt2").exists()        # the first model's program is gone
    assert "torch.export failed" in (folder / "WHY.txt").read_text()
    assert torch.allclose(dcopt.load_exported(folder)(*x), other(*x))


def test_train_and_eval_flags_are_restored(tmp_path):
    model, x = _small()
    model.train()
    model[0].eval()
    dcopt.save_exported(model, tmp_path / "m", example_inputs=x)
    assert [m.training for m in model.modules()] == [True, False, True, True]


def test_a_rounding_noise_output_saved_exactly_passes(tmp_path, monkeypatch):
    """The saved model sums in another order (as a different kernel might): float32 calls
    that 100 % wrong on a rounding-noise output, float64 shows it is rounding."""
    torch.manual_seed(0)
    model, x = _NoiseHead(), (torch.randn(64, 6),)
    flipped = _Reordered()
    with torch.no_grad():                            # its features in reverse order: the same function
        flipped.fc.weight.copy_(model.fc.weight.flip(0))
        flipped.fc.bias.copy_(model.fc.bias.flip(0))
    with torch.no_grad():
        assert dcopt.numcheck.max_relative_error(model(*x)[0], flipped(*x)[0]) > 1e-5   # float32 disagrees
    monkeypatch.setattr(save, "load_exported", lambda folder: flipped)
    dcopt.save_exported(model, tmp_path / "m", example_inputs=x)
    assert (tmp_path / "m" / "__init__.py").exists()

    with torch.no_grad():                            # and a real difference is still caught
        flipped.fc.bias[0] += 1e-3
    monkeypatch.setattr(save, "load_exported", lambda folder: flipped)
    with pytest.raises(dcopt.ExportError, match="persists in float64"):
        dcopt.save_exported(model, tmp_path / "n", example_inputs=x)
