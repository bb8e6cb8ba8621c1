"""LayerNorm / RMSNorm over the feature dim: the gated model takes the statistics over the
kept features only (``dcopt.gates.MaskedNorm``), so the stream a norm sits on (a
transformer's d_model) is learned and the export is the same norm over fewer features."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dcopt
from dcopt.gates import MaskedNorm
from dcopt.numcheck import max_relative_error

from checks import assert_exact_export, converted_exactly

D, HEADS = 16, 4


class Block(nn.Module):
    """A pre-norm transformer block as people write it, with ``norm`` for its norms."""

    def __init__(self, norm=nn.LayerNorm, **kw):
        super().__init__()
        self.inp = nn.Linear(6, D)
        self.n1, self.n2, self.nf = norm(D, **kw), norm(D, **kw), norm(D, **kw)
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.f1, self.f2 = nn.Linear(D, 24), nn.Linear(24, D)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        x = self.inp(x)
        B, T, _ = x.shape
        y = self.n1(x)
        q, k, v = (m(y).view(B, T, HEADS, -1).transpose(1, 2) for m in (self.q, self.k, self.v))
        x = x + self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, -1))
        x = x + self.f2(F.gelu(self.f1(self.n2(x))))
        return self.head(self.nf(x))


X = (torch.randn(2, 5, 6),)
OTHERS = [(torch.randn(3, 9, 6),), (torch.randn(1, 1, 6),)]


def _exact(model, inputs=X, others=OTHERS):
    return converted_exactly(model, inputs, others)


@pytest.mark.parametrize("norm, kw", [(nn.LayerNorm, {}), (nn.LayerNorm, {"elementwise_affine": False}),
                                      (nn.LayerNorm, {"bias": False}), (nn.RMSNorm, {}),
                                      (nn.RMSNorm, {"eps": 1e-3})])
def test_the_stream_through_norms_is_learned(norm, kw):
    dm = _exact(Block(norm, **kw))
    assert "inp" in dm.group_names and dm.plan.groups[dm.group_names.index("inp")].width == D
    dm.set_sizes({"inp": 5})
    small = dcopt.export(dm)
    assert small.n1.normalized_shape == (5,) and small.inp.out_features == 5 and small.f1.in_features == 5
    if small.n1.weight is not None:
        assert small.n1.weight.shape == (5,)
    assert type(small.n1) is norm


def test_the_statistics_are_those_of_the_kept_features():
    """At size 5 the gated norm is a norm over the first 5 features, not over 16 with zeros."""
    torch.manual_seed(0)
    lin, ln = nn.Linear(4, 8), nn.LayerNorm(8)
    model = nn.Sequential(lin, ln, nn.Linear(8, 2))
    x = torch.randn(3, 4)
    dm = dcopt.convert(model, (x,), kappa_min=0.01)
    dm.set_sizes({"0": 5})
    dm.eval()
    wrapped = dm.gm.get_submodule("1")
    assert isinstance(wrapped, MaskedNorm)
    h = lin(x)
    want = F.layer_norm(h[:, :5], (5,), ln.weight[:5], ln.bias[:5])
    got = wrapped(torch.cat([h[:, :5], torch.zeros(3, 3)], 1), dm.gm.get_parameter(f"{dcopt.rewrite.SIZES}.{dm.plan.groups[0].key}"))
    assert max_relative_error(got[:, :5], want) < 1e-6 and bool((got[:, 5:] == 0).all())


def test_the_size_noise_reaches_the_stream_in_training():
    torch.manual_seed(0)
    x, y = torch.randn(16, 5, 6), torch.randn(16, 5, 3)
    dm = dcopt.convert(Block(), (x[:2],), kappa_min=0.1)
    dm.optimize_sizes().train()
    kappa = dict(zip(dm.group_names, dm.size_parameters()))["inp"]
    with torch.no_grad():
        kappa.fill_(0.6)   # s = 9.6: the boundary feature is noisy
    F.mse_loss(dm(x), y).backward()
    assert kappa.grad is not None and float(kappa.grad) != 0


def test_one_norm_called_on_two_streams_couples_them():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.n, self.c = nn.Linear(6, 8), nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 2)

        def forward(self, x):
            return self.c(self.n(self.a(x)) * self.n(self.b(x)))

    dm = _exact(Shared(), (torch.randn(2, 6),), [(torch.randn(5, 6),)])
    assert dm.group_names == ["a"] and set(dm.plan.groups[0].producers) == {"a", "b"}


def test_a_norm_over_features_and_time_keeps_them():
    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.n, self.c = nn.Linear(6, 8), nn.LayerNorm((5, 8)), nn.Linear(8, 2)

        def forward(self, x):
            return self.c(self.n(self.a(x)))

    a = dcopt.analyze(Both(), X)
    assert not a.dynamic_groups and "normalizes over the feature dimension" in a.unsupported[0].reason


def test_reorder_and_save_keep_the_norm_exact(tmp_path):
    torch.manual_seed(0)
    dm = dcopt.convert(Block(), X, kappa_min=0.01)
    with torch.no_grad():
        dm.gm.inp.weight.mul_(torch.linspace(0.2, 3, D)[:, None])
    dcopt.reorder_by_importance(dm)
    dm.set_sizes({"inp": 7})
    small = assert_exact_export(dm, X, others=OTHERS)
    dcopt.save_exported(small, tmp_path / "m", X)
    loaded = dcopt.load_exported(tmp_path / "m")
    assert (tmp_path / "m" / "__init__.py").exists() and loaded.n1.normalized_shape == (7,)
    small.eval()
    with torch.no_grad():
        assert max_relative_error(loaded(*X), small(*X)) == 0


class Offset(nn.Module):
    """A stream far from zero mean (offset 300): the statistics need float32 sums."""

    def __init__(self, norm):
        super().__init__()
        self.a, self.n, self.b = nn.Linear(6, 64), norm(64), nn.Linear(64, 3)

    def forward(self, x):
        return self.b(self.n(self.a(x) + 300.0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm", [nn.LayerNorm, nn.RMSNorm])
def test_low_precision_statistics_match_torch_s_norm(dtype, norm):
    torch.manual_seed(0)
    model = Offset(norm).to(dtype)
    x = torch.randn(4, 5, 6, dtype=dtype)
    dm = dcopt.convert(model, (x,), kappa_min=0.01)
    dm.set_sizes({"a": 40})
    small = dcopt.export(dm)
    dm.eval()
    small.eval()
    with torch.no_grad():
        got, want = dm(x), small(x)
    assert got.dtype == want.dtype == dtype
    assert max_relative_error(got.double(), want.double()) < 0.02   # rounding of dtype, not a wrong norm
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model32 = Offset(norm)
        dm32 = dcopt.convert(model32, (x.float(),), kappa_min=0.01)
        dm32.set_sizes({"a": 40})
        small32 = dcopt.export(dm32).eval()
        got, want = dm32.eval()(x.float()), small32(x.float())
    assert got.dtype == want.dtype and max_relative_error(got.double(), want.double()) < 0.02


def test_a_norm_called_by_keyword_or_read_by_the_forward():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.n, self.b = nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 2)

        def forward(self, x):
            y = self.n(input=self.a(x))
            return self.b(y * self.n.bias)

    dm = _exact(M(), (torch.randn(2, 6),), [(torch.randn(5, 6),)])
    assert dm.group_names == ["a"]


class SubclassNorm(nn.LayerNorm):
    """ESPnet's kind: normalise dim 1 by transposing; fx traces its forward down to F.layer_norm."""

    def forward(self, x):
        return super().forward(x.transpose(1, -1)).transpose(1, -1)


class Functional(nn.Module):
    def __init__(self, how="plain"):
        super().__init__()
        self.how = how
        self.a, self.b, self.c = nn.Conv1d(4, 8, 3, padding=1), nn.Conv1d(8, 8, 1), nn.Conv1d(8, 2, 1)
        self.n = SubclassNorm(8)
        self.r = nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, x):
        h = self.n(self.a(x))
        t = self.b(h).transpose(1, 2)
        if self.how == "computed_weight":
            t = F.layer_norm(t, (8,), self.r * 2)
        elif self.how == "shape_from_tensor":
            t = F.layer_norm(t, t.shape[-1:])
        else:
            t = F.rms_norm(t, (8,), self.r)
        return self.c(t.transpose(1, 2))


def test_functional_norms_are_learned():
    x, others = (torch.randn(2, 4, 10),), [(torch.randn(3, 4, 7),)]
    dm = _exact(Functional(), x, others)
    assert dm.group_names == ["a", "b"]
    dm.set_sizes({"a": 3, "b": 5})
    small = dcopt.export(dm)
    assert "(3,)" in small.code and "(5,)" in small.code and "dcopt" not in small.code
    assert small.n.weight.shape == (3,) and small.r.shape == (5,)


@pytest.mark.parametrize("how, reason", [("computed_weight", "not a parameter read whole"),
                                         ("shape_from_tensor", "normalized_shape is computed in the forward")])
def test_functional_norms_it_cannot_slice_keep_their_width(how, reason):
    a = dcopt.analyze(Functional(how), (torch.randn(2, 4, 10),))
    assert [g.name for g in a.dynamic_groups] == ["a"]
    assert any(reason in r.reason for r in a.rejections if r.group == "b")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("functional", [False, True])
def test_rms_norm_default_eps_is_that_of_float32(dtype, functional):
    """Small activations (mean square ~1e-3): RMSNorm's eps=None means float32's eps, the
    dtype torch computes half inputs in — the half dtype's own eps moved the outputs by 25-80 %."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.n, self.b = nn.Linear(6, 16), nn.RMSNorm(16), nn.Linear(16, 3)

        def forward(self, x):
            h = self.a(x) * 0.03
            return self.b(F.rms_norm(h, (16,), self.n.weight) if functional else self.n(h))

    torch.manual_seed(0)
    x = torch.randn(4, 5, 6, dtype=dtype)
    dm = dcopt.convert(M().to(dtype), (x,), kappa_min=0.01)
    dm.set_sizes({"a": 9})
    small = dcopt.export(dm).eval()
    with torch.no_grad():
        assert max_relative_error(dm.eval()(x).double(), small(x).double()) < 0.02


def test_a_pickled_model_with_a_functional_norm_exports():
    import io
    torch.manual_seed(0)
    x = (torch.randn(2, 4, 10),)
    dm = dcopt.convert(Functional(), x, kappa_min=0.01)
    buf = io.BytesIO()
    torch.save(dm, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    again.set_sizes({"a": 3, "b": 5})
    small = assert_exact_export(again, x, others=[(torch.randn(3, 4, 7),)])
    assert small.n.weight.shape == (3,) and "(3,)" in small.code


def test_in_noisy_training_the_statistics_cover_the_boundary_feature():
    """s = 9.6: the gate passes channels 0-8 and a noisy channel 9 and zeroes the rest, so
    the norm normalises over those 10 (not the ⌈s⌉ rounded up to round_to=4 of eval: 12)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16), nn.Linear(16, 2))
    x = torch.randn(5, 4)
    dm = dcopt.convert(model, (x,), kappa_min=0.01, round_to=4)
    dm.optimize_sizes().train()
    kappa = next(iter(dm.size_parameters()))
    with torch.no_grad():
        kappa.fill_(9.6 / 16)
    norm = dm.gm.get_submodule("1")
    h = torch.cat([torch.randn(5, 10), torch.zeros(5, 6)], 1)   # as the gate hands it on
    want = F.layer_norm(h[:, :10], (10,), norm.norm.weight[:10], norm.norm.bias[:10])
    got = norm(h, kappa)
    assert max_relative_error(got[:, :10], want) < 1e-6 and bool((got[:, 10:] == 0).all())
    dm.eval()
    assert int(norm.gate.kept([kappa], h).sum()) == 12
