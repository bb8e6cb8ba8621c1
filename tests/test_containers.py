"""Containers a model returns: the converted model, the export and the saved code give
back the same container types as the user's model (fx writes every dict as a plain dict
literal, so an OrderedDict used to come back as a dict)."""
import collections
import dataclasses
import subprocess
import sys
from typing import NamedTuple

import pytest
import torch
from torch import nn

import dcopt
from dcopt.errors import ExportError


class Heads(NamedTuple):
    out: torch.Tensor
    aux: torch.Tensor


class _Body(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.out = nn.Conv2d(16, 5, 1)
        self.aux = nn.Conv2d(16, 2, 1)


class SegLike(_Body):
    """torchvision's segmentation models build their result this way."""

    def forward(self, x):
        h = self.stem(x).relu()
        result = collections.OrderedDict()
        result["out"] = self.out(h)
        result["aux"] = self.aux(h)
        return result


class NamedHeads(_Body):
    def forward(self, x):
        h = self.stem(x).relu()
        return Heads(self.out(h), self.aux(h))


class ReturnsFeatures(_Body):
    """The gated features themselves are part of the output."""

    def forward(self, x):
        h = self.stem(x).relu()
        return collections.OrderedDict(feats=h, out=self.out(h)), Heads(h, self.aux(h))


def _same(a, b):
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    else:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [SegLike, NamedHeads])
def test_container_type_survives_convert_export_and_save(cls, tmp_path):
    torch.manual_seed(0)
    model = cls().eval()
    x = torch.randn(2, 3, 8, 8)
    dm = dcopt.convert(model, (x,))
    assert dm.analysis.group("stem").status == "dynamic"
    _same(dm.eval()(x), model(x))
    dm.set_sizes({"stem": 7})
    small = dcopt.export(dm)
    other = torch.randn(3, 3, 10, 6)
    _same(small(other), dm(other))
    _same(dcopt.export(dm, keep_class=False)(other), dm(other))
    if cls is SegLike:   # a namedtuple of this test module can be imported by name: in-process only
        dcopt.save_exported(small, tmp_path / "m", (x,))
        _same(dcopt.load_exported(tmp_path / "m")(other), dm(other))


def test_saved_code_builds_an_ordered_dict_without_dcopt(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    dm = dcopt.convert(SegLike().eval(), (x,))
    dm.set_sizes({"stem": 5})
    dcopt.save_exported(dcopt.export(dm), tmp_path / "m", (x,))
    code = (
        "import importlib.util, sys, torch, collections\n"
        f"spec = importlib.util.spec_from_file_location('m', {str(tmp_path / 'm' / '__init__.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "out = m.load()(torch.randn(2, 3, 8, 8))\n"
        "assert 'dcopt' not in sys.modules\n"
        "print(type(out).__name__, list(out))\n")
    done = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "OrderedDict ['out', 'aux']"


def test_features_in_an_output_container_keep_their_width_for_that_reason():
    x = torch.randn(2, 3, 8, 8)
    analysis = dcopt.analyze(ReturnsFeatures(), (x,))
    stem = analysis.group("stem")
    assert stem.status == "fixed"
    assert any("reaches the model output" in r for r in stem.reasons)
    assert not any("no rule" in r for r in stem.reasons)


def test_a_namedtuple_of_the_running_script_is_refused_with_the_reason(tmp_path):
    main_heads = NamedTuple("Heads", [("out", torch.Tensor), ("aux", torch.Tensor)])
    main_heads.__module__ = "__main__"

    class MainHeads(_Body):
        def forward(self, x):
            h = self.stem(x).relu()
            return main_heads(self.out(h), self.aux(h))

    x = torch.randn(2, 3, 8, 8)
    gm = dcopt.export(dcopt.convert(MainHeads().eval(), (x,)), keep_class=False)
    with pytest.raises(ExportError, match=r"defined in the script being run \(__main__\)"):
        dcopt.save_exported(gm, tmp_path / "m", (x,))


@dataclasses.dataclass
class Result:
    logits: torch.Tensor
    features: torch.Tensor
    note: str = "ok"


class ReturnsDataclass(_Body):
    def forward(self, x):
        h = self.stem(x).relu()
        return Result(self.out(h), self.aux(h).mean((2, 3)))


def test_a_dataclass_output_converts_and_exports():
    """numcheck compared dataclass outputs with ``==`` (a tensor's truth value: a raw
    RuntimeError from convert)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = ReturnsDataclass().eval()
    dm = dcopt.convert(model, (x,))
    got = dm.eval()(x)
    assert type(got) is Result
    torch.testing.assert_close(got.logits, model(x).logits)
    dm.set_sizes({"stem": 6})
    small = dcopt.export(dm)
    other = torch.randn(3, 3, 6, 10)
    out, ref = small(other), dm(other)
    assert type(out) is Result and out.note == "ok"
    torch.testing.assert_close(out.logits, ref.logits)
    torch.testing.assert_close(out.features, ref.features)


def test_numcheck_compares_dataclasses_by_fields():
    from dcopt.numcheck import agreement, max_relative_error
    a = Result(torch.ones(3), torch.zeros(2))
    assert max_relative_error(a, Result(torch.ones(3), torch.zeros(2))) == 0.0
    assert max_relative_error(a, Result(torch.ones(3) * 2, torch.zeros(2))) == 1.0
    assert max_relative_error(a, Result(torch.ones(3), torch.zeros(2), note="other")) == float("inf")
    assert max_relative_error({"t": [torch.ones(1)]}, {"t": [torch.ones(1)], "u": 1}) == float("inf")
    assert agreement(a, Result(torch.ones(3), torch.zeros(2)), 1e-5, None).ok
