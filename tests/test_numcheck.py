"""The numeric checks (export, fold, reorder) tell float32 rounding from a real error.

A model whose output is rounding noise (a mean over a dimension a LayerNorm just
normalised) made export's float32 relative check fail on exact exports: "a dcopt bug"
25 times in 30. The float64 second opinion (dcopt.numcheck) passes those and still
catches a wrong export."""
import importlib
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dcopt
from dcopt.numcheck import agreement, max_relative_error, to_float64


class NoiseOut(nn.Module):
    """Outputs ``mean(layer_norm(h))`` — 0 in exact arithmetic, float32 rounding noise in
    practice — and, with ``with_h``, ``h`` itself (an ordinary output)."""

    def __init__(self, with_h: bool = False):
        super().__init__()
        self.a, self.b, self.with_h = nn.Linear(8, 32), nn.Linear(32, 6), with_h

    def forward(self, x):
        h = self.b(torch.relu(self.a(x)))
        noise = F.layer_norm(h, h.shape[-1:]).mean(-1)
        return (noise, h) if self.with_h else noise


def test_exact_exports_of_a_rounding_noise_output_pass():
    rng = random.Random(0)
    for seed in range(20):
        torch.manual_seed(seed)
        x = torch.randn(4, 8)
        dm = dcopt.convert(NoiseOut(), (x,), kappa_min=0.01)
        dm.set_sizes({"a": rng.randint(1, 32)})
        small = dcopt.export(dm)   # raised ExportError ("a dcopt bug") before the float64 recheck
        # the exported layers are the kept slices: the export is exact, whatever the output's noise
        n = small.a.out_features
        assert torch.equal(small.a.weight, dm.gm.a.weight[:n]) and torch.equal(small.b.weight, dm.gm.b.weight[:, :n])


@pytest.mark.parametrize("with_h", [False, True])
def test_a_wrong_export_is_still_caught(monkeypatch, with_h):
    """A slicing error (simulated: one kept weight nudged by 1e-3) fails the check in
    float64 too, also next to an output that is rounding noise."""
    ex = importlib.import_module("dcopt.export")
    real = ex.slice_graph_module

    def wrong(gm, plan, sizes):
        out = real(gm, plan, sizes)
        with torch.no_grad():
            out.get_submodule("b").weight[0, 0] += 1e-3
        return out

    class Plain(NoiseOut):
        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    x = torch.randn(4, 8)
    model = NoiseOut(with_h=True) if with_h else Plain()
    dm = dcopt.convert(model, (x,), kappa_min=0.01)
    dm.set_sizes({"a": 20})
    monkeypatch.setattr(ex, "slice_graph_module", wrong)
    with pytest.raises(dcopt.ExportError, match="persists in float64"):
        dcopt.export(dm)


def test_reorder_of_a_rounding_noise_output_passes():
    for seed in range(10):
        torch.manual_seed(seed)
        x = torch.randn(4, 8)
        dm = dcopt.convert(NoiseOut(with_h=True), (x,))
        with torch.no_grad():
            h = dm.eval()(x)[1]
        r = dcopt.reorder_by_importance(dm, importance={"a": torch.randn(32)})
        assert "a" in r.perms and r.max_error is not None
        with torch.no_grad():   # the ordinary output confirms the permutation kept the function
            assert max_relative_error(h, dm(x)[1]) < 1e-6


def test_agreement_tells_rounding_from_an_error():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    x = torch.randn(256)
    perm = torch.randperm(256)

    def outputs(dtype, offset=0.0):
        wd, xd = w.to(dtype), x.to(dtype)
        a = (wd @ xd) - (wd @ xd).mean()       # centred: small next to its terms
        b = (wd[:, perm] @ xd[perm]) - (wd[:, perm] @ xd[perm]).mean() + offset
        return a.sum(), b.sum()                 # the sum of a centred vector: rounding noise

    ref, cand = outputs(torch.float32)
    assert max_relative_error(ref, cand) > 1e-5            # float32 alone would call it wrong
    ok = agreement(ref, cand, 1e-5, lambda: outputs(torch.float64))
    assert ok.ok and ok.how == "float64"
    ref, cand = outputs(torch.float32, offset=1e-4)
    bad = agreement(ref, cand, 1e-5, lambda: outputs(torch.float64, offset=1e-4))
    assert not bad.ok and "persists in float64" in bad.describe(1e-5)

    def cannot():
        raise RuntimeError("float32 only kernel")

    stands = agreement(ref, cand, 1e-5, cannot)
    assert not stands.ok and stands.how == "float32 only"
    # passing in float32, or differing in structure, never asks for float64
    assert agreement(ref, ref, 1e-5, cannot).ok
    assert not agreement((ref,), (ref, ref), 1e-5, cannot).ok


def test_to_float64_keeps_integer_inputs():
    ids, x = torch.tensor([1, 2]), torch.randn(2)
    out = to_float64({"ids": ids, "x": [x]})
    assert out["ids"].dtype == torch.long and out["x"][0].dtype == torch.float64


def test_to_float64_rebuilds_packed_sequences():
    packed = torch.nn.utils.rnn.pack_sequence([torch.randn(3, 2), torch.randn(2, 2)])
    out = to_float64(packed)
    assert isinstance(out, torch.nn.utils.rnn.PackedSequence)
    assert out.data.dtype == torch.float64 and torch.equal(out.batch_sizes, packed.batch_sizes)
