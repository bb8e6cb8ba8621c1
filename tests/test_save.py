"""save_exported: what it leaves on disk is the model, or nothing that could be loaded."""
from pathlib import Path

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


def _load_back(folder):
    """The standalone code's model, imported from the folder as a user would."""
    return dcopt.load_exported(folder)


# -- layers rebuilt from constructor calls -------------------------------------------------

@pytest.mark.parametrize("layer, setting", [
    (nn.AvgPool2d(2, ceil_mode=True), "ceil_mode"),
    (nn.AvgPool1d(3, 2, 1, count_include_pad=False), "count_include_pad"),
    (nn.AvgPool2d(2, divisor_override=3), "divisor_override"),
    (nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True), "align_corners"),
    (nn.Upsample(scale_factor=1.5, mode="bilinear", recompute_scale_factor=True), "recompute_scale_factor"),
    (nn.RNN(4, 8, nonlinearity="relu"), "nonlinearity"),
    (nn.MaxPool2d(2, return_indices=True), "return_indices"),
    (nn.AdaptiveMaxPool2d(3, return_indices=True), "return_indices"),
    (nn.EmbeddingBag(10, 4, include_last_offset=True), "include_last_offset"),
])
def test_a_setting_that_repr_leaves_out_is_kept(layer, setting):
    """``repr`` omits these constructor arguments: a layer rebuilt from it alone loads the
    weights and computes something else (at some shape), with no error anywhere."""
    expr = save._constructor(layer)
    assert expr is not None
    rebuilt = eval(expr, {"torch": torch})
    assert getattr(rebuilt, setting) == getattr(layer, setting), expr


def test_a_constructor_call_that_builds_another_layer_is_refused(monkeypatch):
    """The check behind every expression: with the call from attributes unavailable, the
    repr's AvgPool2d(kernel_size=2, stride=2, padding=0) builds a layer that loads the
    (no) weights and pools another way; it must not be written."""
    monkeypatch.setattr(save, "_call_from_attributes", lambda module: (None, "not today"))
    expr, why = save._rebuild(nn.AvgPool2d(2, ceil_mode=True))
    assert expr is None
    assert "ceil_mode is True, rebuilt False" in why


def test_a_multihead_attention_layer_is_written_as_code(tmp_path):
    """Its repr spans lines (it has a submodule): rebuilt from its attributes instead."""
    torch.manual_seed(0)

    class Attend(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x)[0]

    model, x = Attend().eval(), torch.randn(2, 5, 8)
    folder = dcopt.save_exported(model, tmp_path / "m", example_inputs=(x,))
    assert not (folder / "WHY.txt").exists()
    longer = torch.randn(3, 7, 8)
    with torch.no_grad():
        assert torch.allclose(_load_back(folder)(longer), model(longer), atol=1e-6)


def test_saved_code_pools_like_the_model_at_a_shape_the_example_did_not_have(tmp_path):
    """AvgPool2d(2, ceil_mode=True) agrees with ceil_mode=False at the even example size:
    only another shape shows the difference, and the README says __init__.py runs at any."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AvgPool2d(2, ceil_mode=True)).eval()
    dcopt.save_exported(model, tmp_path / "m", example_inputs=(torch.randn(2, 3, 16, 16),))
    odd = torch.randn(2, 3, 15, 15)
    with torch.no_grad():
        expected, got = model(odd), _load_back(tmp_path / "m")(odd)
    assert got.shape == expected.shape == (2, 4, 8, 8)
    assert torch.allclose(got, expected, atol=1e-6)


def test_string_arguments_are_written_quoted(tmp_path):
    """Conv2d's repr prints padding=same and padding_mode=reflect unquoted, which does not
    run: the layer was refused as 'not a plain torch.nn layer'."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding="same", padding_mode="reflect")).eval()
    folder = dcopt.save_exported(model, tmp_path / "m", example_inputs=(torch.randn(1, 3, 8, 8),))
    assert not (folder / "WHY.txt").exists()
    other = torch.randn(2, 3, 5, 7)
    with torch.no_grad():
        assert torch.allclose(_load_back(folder)(other), model(other), atol=1e-6)


def test_why_names_the_cause_when_a_torch_nn_layer_cannot_be_rebuilt():
    """TransformerEncoderLayer is plain torch.nn; it keeps no d_model attribute to rebuild it from."""
    model = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True))
    expr, why = save._rebuild(model[0])
    assert expr is None
    assert "d_model" in why and "not a plain torch.nn layer" not in why


def test_saved_layers_do_not_depend_on_torchs_defaults(tmp_path, monkeypatch):
    """Every constructor argument is written out, defaults too: loaded under a torch whose
    default changed (here Conv2d's padding_mode), the code still builds the saved layer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU()).eval()
    x = torch.randn(1, 2, 6, 6)
    dcopt.save_exported(model, tmp_path / "m", example_inputs=(x,))
    defaults = list(nn.Conv2d.__init__.__defaults__)
    defaults[defaults.index("zeros")] = "reflect"
    monkeypatch.setattr(nn.Conv2d.__init__, "__defaults__", tuple(defaults))
    assert nn.Conv2d(2, 4, 3, padding=1).padding_mode == "reflect"     # the changed default took
    loaded = _load_back(tmp_path / "m")
    assert loaded.get_submodule("0").padding_mode == "zeros"
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


# -- dtypes --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_model_in_another_dtype_loads_back_in_it(tmp_path, dtype):
    """The code builds its layers in float32; load_state_dict used to copy the weights into
    them, so the saved model failed its check (float64 inputs into float32 layers) or, with
    nothing to check against, came back in float32."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval().to(dtype)
    x = (torch.randn(5, 4, dtype=dtype),)
    for folder, inputs in ((tmp_path / "checked", x), (tmp_path / "unchecked", None)):
        dcopt.save_exported(model, folder, example_inputs=inputs)
        loaded = _load_back(folder)
        assert {t.dtype for t in loaded.parameters()} == {dtype}
        assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in loaded.parameters())
        assert {n for n, _ in loaded.named_buffers()} == {n for n, _ in model.named_buffers()}
        with torch.no_grad():
            assert torch.equal(loaded(*x), model(*x))


# -- model.pt2: written and loadable, or not there ------------------------------------------

class _Tagged(nn.Module):
    """An output holding a str: torch.export.save writes it, torch.export.load cannot read it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x), "logits"


def test_a_model_pt2_that_does_not_load_back_is_left_out_and_the_code_kept(tmp_path):
    torch.manual_seed(0)
    model, x = _Tagged().eval(), (torch.randn(2, 4),)
    folder = dcopt.save_exported(model, tmp_path / "m", example_inputs=x)
    assert {p.name for p in folder.iterdir()} == {"__init__.py", "weights.pt", "WHY.txt"}
    assert "model.pt2 not written: torch.export.load cannot read back" in (folder / "WHY.txt").read_text()
    out, tag = _load_back(folder)(*x)
    assert tag == "logits" and torch.equal(out, model(*x)[0])


def test_a_model_pt2_that_torch_fails_to_finish_writing_is_removed(tmp_path, monkeypatch):
    model, x = _small()

    def half_written(program, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04 part of an archive")
        raise RuntimeError("cannot serialise this output")

    monkeypatch.setattr(torch.export, "save", half_written)
    folder = dcopt.save_exported(model, tmp_path / "m", example_inputs=x)
    assert not (folder / "model.pt2").exists()
    assert "model.pt2 not written: torch.export.save failed" in (folder / "WHY.txt").read_text()
    assert (folder / "__init__.py").exists()


# -- files in the way ----------------------------------------------------------------------

def test_a_users_package_in_the_folder_is_left_alone(tmp_path):
    """`dcopt export -o mypkg` overwrote the package's own __init__.py and weights.pt."""
    model, x = _small()
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('VALUE = "user code"\n')
    (pkg / "weights.pt").write_text("user weights")
    with pytest.raises(dcopt.ExportError, match=r"__init__.py is in the way"):
        dcopt.save_exported(model, pkg, example_inputs=x)
    assert (pkg / "__init__.py").read_text() == 'VALUE = "user code"\n'
    assert {p.name for p in pkg.iterdir()} == {"__init__.py", "weights.pt"}


@pytest.mark.parametrize("name", ["weights.pt", "model.pt2", "WHY.txt"])
def test_a_file_of_a_dcopt_name_outside_a_dcopt_folder_is_left_alone(tmp_path, name):
    """Without a dcopt __init__.py (or WHY.txt) beside it, nothing says dcopt wrote it."""
    model, x = _small()
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / name).write_text("the user's")
    with pytest.raises(dcopt.ExportError, match=f"{name} is in the way"):
        dcopt.save_exported(model, tmp_path / "m", example_inputs=x)
    assert [p.name for p in (tmp_path / "m").iterdir()] == [name]
    assert (tmp_path / "m" / name).read_text() == "the user's"


def test_an_earlier_save_of_model_pt2_alone_is_replaced(tmp_path, monkeypatch):
    """A save that could not write __init__.py leaves model.pt2 and WHY.txt: dcopt's, by its WHY.txt."""
    model, x = _small()

    def no_code(m, name):
        raise dcopt.ExportError("not this time")

    with monkeypatch.context() as patch:
        patch.setattr(save, "_python_source", no_code)
        dcopt.save_exported(model, tmp_path / "m", example_inputs=x)
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"model.pt2", "WHY.txt"}
    folder = dcopt.save_exported(model, tmp_path / "m", example_inputs=x)
    assert {p.name for p in folder.iterdir()} == {"model.pt2", "__init__.py", "weights.pt"}
