"""The walk's net for functions and methods: every tracked tensor reaching an op must be
passed on, consumed, read only for its shape or dtype, or rejected by the op's rule.
A rule that ignores an argument used to leave that group dynamic with nothing gating it,
so the export sliced features the gated model still used (found by a red-team pass)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dcopt
from checks import assert_exact_export


def _status(model, x):
    return {g.name: g.status for g in dcopt.analyze(model, (x,)).groups}


def _reasons(model, x, name):
    return dcopt.analyze(model, (x,)).group(name).reasons


class IndexFromFeatures(nn.Module):
    """A lookup whose index is computed from the features: which rows it picks depends on
    every feature, so none may be removed."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 16)
        self.table = nn.Parameter(torch.randn(7, 16))
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        h = self.fc1(x)
        idx = (torch.sigmoid(h) * 6).round().to(torch.long)
        return self.fc2(self.table[idx].amax(1))


def test_an_index_computed_from_features_keeps_their_width():
    x = torch.randn(5, 4)
    status = _status(IndexFromFeatures(), x)
    assert status["fc1"] == "rejected"
    assert any("argument its rule does not read" in r for r in _reasons(IndexFromFeatures(), x, "fc1"))


class HyperNorm(nn.Module):
    """layer_norm whose weight and bias are computed from other features."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 10)
        self.hyper_w = nn.Linear(4, 10)
        self.hyper_b = nn.Linear(4, 10)
        self.head = nn.Linear(10, 2)

    def forward(self, x):
        w = self.hyper_w(x).mean(0)
        b = self.hyper_b(x).mean(0)
        return self.head(F.layer_norm(self.body(x), (10,), w, b))


def test_a_computed_layer_norm_weight_keeps_its_width():
    x = torch.randn(6, 4)
    status = _status(HyperNorm(), x)
    assert status["hyper_w"] == "rejected" and status["hyper_b"] == "rejected"
    dm = dcopt.convert(HyperNorm(), (x,))
    assert dm.analysis.dynamic_groups == [] or all(g.name not in ("hyper_w", "hyper_b")
                                                  for g in dm.analysis.dynamic_groups)


class BinaryMax(nn.Module):
    """A ReLU written as binary max/min with the tracked tensor second, the result then
    max-pooled over time (not features) and classified."""

    def __init__(self, form):
        super().__init__()
        self.form = form
        self.conv = nn.Conv1d(3, 16, 3, padding=1)
        self.head = nn.Conv1d(16, 4, 1)

    def forward(self, x):
        h = self.conv(x)
        zero = torch.zeros((), dtype=h.dtype)
        if self.form == "function":
            r = torch.max(zero, h)
        elif self.form == "min":
            r = -torch.min(zero, -h)
        else:
            r = zero.max(h)
        return self.head(r)


def test_binary_max_and_min_are_elementwise_and_export_exactly():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12)
    for form in ("function", "min", "method"):
        dm = dcopt.convert(BinaryMax(form).eval(), (x,))
        assert [g.name for g in dm.analysis.dynamic_groups] == ["conv"], form
        assert_exact_export(dm, (x,), {"conv": 5}, others=[(torch.randn(3, 3, 7),)])


class BinaryMaxPooled(BinaryMax):
    """The same, max-pooled over the features: now the op sees every feature."""

    def forward(self, x):
        r = torch.max(torch.zeros(()), self.conv(x))
        return self.head(r) * r.amax(1, keepdim=True)


def test_binary_max_feeding_a_feature_reduction_keeps_the_width():
    assert _status(BinaryMaxPooled("function"),
                   torch.randn(2, 3, 12))["conv"] == "rejected"


class CatAxis(nn.Module):
    """torch's numpy-style ``axis=`` for ``dim=``."""

    def __init__(self, kw):
        super().__init__()
        self.kw = kw
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(4, 8)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        h = torch.cat([self.a(x), self.b(x)], **{self.kw: 1})
        parts = torch.chunk(h, 2, **{self.kw: 0})
        return self.fc(torch.cat(parts, **{self.kw: 0}))


def test_axis_is_read_as_dim():
    torch.manual_seed(0)
    x = torch.randn(4, 4)
    with_dim = dcopt.convert(CatAxis("dim").eval(), (x,))
    with_axis = dcopt.convert(CatAxis("axis").eval(), (x,))
    assert [g.name for g in with_axis.analysis.dynamic_groups] == [g.name for g in with_dim.analysis.dynamic_groups] \
        == ["a", "b"]
    assert_exact_export(with_axis, (x,), {"a": 3, "b": 6}, others=[(torch.randn(6, 4),)])


class CastLike(nn.Module):
    """``type_as(other)`` reads only the other tensor's dtype: its group stays dynamic."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(4, 6)
        self.fa = nn.Linear(8, 2)
        self.fb = nn.Linear(6, 2)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        return self.fa(a.type_as(b)) + self.fb(b)


def test_reading_only_a_dtype_keeps_the_group_dynamic():
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    dm = dcopt.convert(CastLike().eval(), (x,))
    assert sorted(g.name for g in dm.analysis.dynamic_groups) == ["a", "b"]
    assert_exact_export(dm, (x,), {"a": 3, "b": 2}, others=[(torch.randn(5, 4),)])


class NewZeros(nn.Module):
    """``h.new_zeros(...)`` reads only h's dtype and device; a size read from h's width
    keeps the group fixed."""

    def __init__(self, sized_like_h):
        super().__init__()
        self.sized_like_h = sized_like_h
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        if self.sized_like_h:
            return self.b(h + h.new_zeros(h.shape))
        return torch.cat([self.b(h), h.new_zeros(x.shape[0], 2)], 1)


def test_new_zeros_reads_only_the_dtype():
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    dm = dcopt.convert(NewZeros(False).eval(), (x,))
    assert [g.name for g in dm.analysis.dynamic_groups] == ["a"]
    assert_exact_export(dm, (x,), {"a": 3}, others=[(torch.randn(5, 4),)])
    assert _status(NewZeros(True), x)["a"] == "rejected"


class AttentionPooling(nn.Module):
    """softmax(att(h), dim=time) * h: att(h) is (B, T, 1), one feature broadcast along
    h's features — a per-frame weight, not a channel meeting h's."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(4, 16, batch_first=True)
        self.att = nn.Linear(16, 1)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        h, _ = self.rnn(x)
        return self.out((torch.softmax(self.att(h), dim=1) * h).sum(1))


def test_a_one_feature_weight_broadcast_over_features_leaves_them_dynamic():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 4)
    dm = dcopt.convert(AttentionPooling().eval(), (x,))
    assert [g.name for g in dm.analysis.dynamic_groups] == ["rnn"]
    assert dm.analysis.group("att").status == "fixed"
    assert_exact_export(dm, (x,), {"rnn": 5}, others=[(torch.randn(3, 11, 4),)])


class Embedding(nn.Module):
    """A speaker-embedding head: the embedding normalised (or scaled by its energy) over
    its features before the classifier."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.conv = nn.Conv1d(3, 16, 3, padding=1)
        self.emb = nn.Linear(16, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        e = self.emb(h.mean(2) + 0.1 * h.pow(2).sum((1, 2)).unsqueeze(1))
        z = {
            "normalize": lambda: F.normalize(e, dim=1),
            "norm": lambda: e / e.norm(dim=1, keepdim=True),
            "vector_norm": lambda: e / torch.linalg.vector_norm(e, dim=-1, keepdim=True),
            "inf_norm": lambda: e / e.norm(p=float("inf"), dim=1, keepdim=True),
            "energy": lambda: e * e.pow(2).sum(-1, keepdim=True),
            "negative_norm": lambda: e / e.norm(p=-1, dim=1, keepdim=True),
            "amax": lambda: e / e.amax(1, keepdim=True),
            "mean": lambda: e - e.mean(1, keepdim=True),
        }[self.how]()
        return self.out(z)


@pytest.mark.parametrize("how", ["normalize", "norm", "vector_norm", "inf_norm", "energy"])
def test_sums_and_positive_norms_over_the_features_export_exactly(how):
    """A gate in front of them zeroes the removed features, which a sum or a p-norm (p > 0)
    ignores: the sliced export computes the same (also the conv's sum over (C, T))."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 10)
    dm = dcopt.convert(Embedding(how).eval(), (x,))
    assert sorted(g.name for g in dm.analysis.dynamic_groups) == ["conv", "emb"]
    assert_exact_export(dm, (x,), {"conv": 5, "emb": 3}, others=[(torch.randn(6, 3, 13),)])


@pytest.mark.parametrize("how", ["negative_norm", "amax", "mean"])
def test_reductions_a_zero_changes_keep_the_width(how):
    assert _status(Embedding(how), torch.randn(4, 3, 10))["emb"] == "rejected"


# -- matrix products -------------------------------------------------------------------

class PoolByProduct(nn.Module):
    """Attention pooling written as a matrix product: (B, 1, T) @ (B, T, H)."""

    def __init__(self, op):
        super().__init__()
        self.op = op
        self.rnn = nn.GRU(4, 16, batch_first=True)
        self.att = nn.Linear(16, 1)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        h, _ = self.rnn(x)
        w = torch.softmax(self.att(h).squeeze(-1), dim=1).unsqueeze(1)
        z = torch.bmm(w, h) if self.op == "bmm" else w @ h
        return self.out(z.squeeze(1))


class SingleHeadAttention(nn.Module):
    """q·kᵀ contracts q's and k's features (coupled: the same features kept on both);
    attention @ v keeps v's."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Conv1d(3, 12, 1)
        self.q = nn.Linear(12, 8)
        self.k = nn.Linear(12, 8)
        self.v = nn.Linear(12, 10)
        self.out = nn.Linear(10, 3)

    def forward(self, x):
        h = self.inp(x).transpose(1, 2)
        scores = torch.matmul(self.q(h), self.k(h).transpose(1, 2)) * 0.35
        return self.out(torch.softmax(scores, dim=-1) @ self.v(h))


class ProductWithParameters(nn.Module):
    """h @ W and V @ hᵀ with parameters: their rows (columns) are sliced with h's group."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 16)
        self.W = nn.Parameter(torch.randn(16, 5))
        self.V = nn.Parameter(torch.randn(3, 16))

    def forward(self, x):
        h = torch.relu(self.a(x))
        return (h @ self.W) + (self.V @ h.transpose(1, 2)).transpose(1, 2).sum(-1, keepdim=True)


@pytest.mark.parametrize("model,x,sizes,other", [
    (PoolByProduct("matmul"), (2, 7, 4), {"rnn": 5}, (3, 9, 4)),
    (PoolByProduct("bmm"), (2, 7, 4), {"rnn": 5}, (3, 9, 4)),
    (SingleHeadAttention(), (2, 3, 7), {"inp": 5, "q": 3, "v": 4}, (3, 3, 9)),
    (ProductWithParameters(), (2, 7, 4), {"a": 6}, (3, 9, 4)),
], ids=["pool-matmul", "pool-bmm", "attention", "parameters"])
def test_matrix_products_export_exactly(model, x, sizes, other):
    torch.manual_seed(0)
    x = torch.randn(*x)
    dm = dcopt.convert(model.eval(), (x,))
    assert set(sizes) <= {g.name for g in dm.analysis.dynamic_groups}
    assert_exact_export(dm, (x,), sizes, others=[(torch.randn(*other),)])


class ProductWithComputed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 16)

    def forward(self, x):
        return self.a(x) @ (torch.ones(16, 5) * x.mean())


class OuterOfGroups(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(4, 5)

    def forward(self, x):
        return (self.a(x).unsqueeze(-1) @ self.b(x).unsqueeze(-2)).flatten(1)


def test_matrix_products_dcopt_cannot_slice_keep_the_width():
    x = torch.randn(3, 2, 4)
    assert _status(ProductWithComputed(), x)["a"] == "rejected"
    status = _status(OuterOfGroups(), torch.randn(3, 4))
    assert status["a"] != "dynamic" and status["b"] != "dynamic"


def test_a_one_feature_group_is_fixed_not_a_problem():
    """att(h) of width 1, squeezed and softmaxed over time: its rejection is no problem
    (one feature cannot shrink), so strict mode and `dcopt check --strict` pass."""
    x = torch.randn(2, 7, 4)
    analysis = dcopt.analyze(PoolByProduct("bmm"), (x,))
    assert analysis.group("att").status == "fixed"
    assert not analysis.unsupported
    dcopt.convert(PoolByProduct("bmm"), (x,), strict=True)


class IntegerFeatures(nn.Module):
    """Features turned into integers or bools, then summed / any()-ed over: no gate can
    carry the optimize phase's noise on them (fit crashed in torch's std)."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        r = h.round().to(torch.int64).sum(-1) if self.kind == "int" else h.to(torch.bool).any(-1)
        return self.b(x) * r.unsqueeze(-1).to(x.dtype)


@pytest.mark.parametrize("kind", ["int", "bool"])
def test_integer_features_are_not_gated(kind):
    x = torch.randn(3, 4)
    analysis = dcopt.analyze(IntegerFeatures(kind), (x,))
    assert analysis.group("a").status == "rejected"
    assert any("cannot carry the size noise" in r for r in analysis.group("a").reasons)


class WeightOfAnUncalledLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 8)
        self.lin = nn.Linear(5, 8)

    def forward(self, x):
        return (torch.relu(self.a(x)) @ self.lin.weight).sum(-1)


def test_a_layers_weight_in_a_product_is_not_sliced_apart_from_the_layer():
    """Slicing lin.weight for h @ self.lin.weight left lin's bias and out_features at 8:
    the exported lin could not be called."""
    x = torch.randn(2, 7, 3)
    analysis = dcopt.analyze(WeightOfAnUncalledLayer(), (x,))
    assert analysis.group("a").status == "rejected"
    assert any("a weight of layer lin" in r for r in analysis.group("a").reasons)


class PoolTransposed(PoolByProduct):
    def forward(self, x):
        h, _ = self.rnn(x)
        return self.out((torch.softmax(self.att(h), dim=1).transpose(1, 2) @ h).squeeze(1))


def test_attention_pooling_with_a_transposed_weight_stays_dynamic():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 4)
    dm = dcopt.convert(PoolTransposed("matmul").eval(), (x,))
    assert [g.name for g in dm.analysis.dynamic_groups] == ["rnn"]
    assert_exact_export(dm, (x,), {"rnn": 5}, others=[(torch.randn(3, 9, 4),)])


# -- buffers sliced to the input's length ------------------------------------------------

class PositionalEncoding(nn.Module):
    def __init__(self, width=16, cut_features=False):
        super().__init__()
        self.cut_features = cut_features
        self.register_buffer("pe", torch.randn(100, width))

    def forward(self, h):
        pe = self.pe[:h.size(1), :8] if self.cut_features else self.pe[:h.size(1)]
        return h + pe


class Encoder(nn.Module):
    """``h + self.pe[:T]``: the tutorial/Whisper positional encoding, in the top-level
    forward or in a submodule. It failed to trace at the top level (a real tensor indexed
    by a traced number) and made its block opaque in a submodule."""

    def __init__(self, top_level, cut_features=False):
        super().__init__()
        self.top_level = top_level
        self.inp = nn.Linear(4, 8 if cut_features else 16)
        self.pos = PositionalEncoding(cut_features=cut_features)
        self.register_buffer("pe", torch.randn(100, 16))
        self.out = nn.Linear(8 if cut_features else 16, 2)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.pe[:x.size(1)] if self.top_level else self.pos(h)
        return self.out(torch.relu(h))


@pytest.mark.parametrize("top_level", [True, False], ids=["top-level", "submodule"])
def test_a_buffer_sliced_to_the_length_is_sliced_with_the_group(top_level):
    torch.manual_seed(0)
    x = torch.randn(2, 7, 4)
    dm = dcopt.convert(Encoder(top_level).eval(), (x,))
    assert [g.name for g in dm.analysis.dynamic_groups] == ["inp"]
    assert_exact_export(dm, (x,), {"inp": 5}, others=[(torch.randn(3, 11, 4),)])


def test_a_buffer_cut_along_the_features_keeps_the_width():
    x = torch.randn(2, 7, 4)
    assert _status(Encoder(False, cut_features=True), x)["inp"] != "dynamic"


class BranchesOnABuffer(nn.Module):
    """A forward that branches on a buffer's value traces with the buffer as a plain
    tensor (as before): dcopt falls back to that."""

    def __init__(self):
        super().__init__()
        self.register_buffer("use_bias", torch.tensor(1))
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x):
        h = self.a(x)
        if self.use_bias.item() > 0:
            h = h + 1
        return self.b(h)


def test_a_forward_branching_on_a_buffer_still_converts():
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    dm = dcopt.convert(BranchesOnABuffer().eval(), (x,))
    assert_exact_export(dm, (x,), {"a": 3}, others=[(torch.randn(5, 4),)])


class ProductWithASlicedParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.W = nn.Parameter(torch.randn(16, 3))

    def forward(self, x):
        return self.a(x) @ self.W[:5]


def test_a_product_with_a_slice_of_a_parameter_keeps_the_width():
    """W[:5] holds 5 of W's 16 rows: W cannot be sliced with a's features."""
    assert _status(ProductWithASlicedParameter(), torch.randn(2, 4))["a"] == "rejected"


class ViewAlsoUsedElsewhere(nn.Module):
    """One view of pe added to the features and also handed to an op with no rule
    (flip): pe must keep its shape, or flip sees the sliced buffer after export."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 16)
        self.register_buffer("pe", torch.randn(100, 16))
        self.out = nn.Linear(16, 2)

    def forward(self, x):
        v = self.pe[:x.size(1)]
        y = self.out(torch.relu(self.inp(x) + v))
        return y + torch.flip(v, [-1])[:, :2]


def test_a_view_handed_to_an_op_without_a_rule_keeps_the_buffer_whole():
    status = _status(ViewAlsoUsedElsewhere(), torch.randn(2, 7, 4))
    assert status["inp"] != "dynamic"


class AssignsABuffer(nn.Module):
    """``self.cnt = self.cnt * 2``: fx ran the assignment while tracing and the graph read
    the new value, which matched the user's first call only; from the second call on the
    converted model computed something else, silently. The traced copy's buffers are now
    given back after tracing, so convert's full-width check sees the difference."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.register_buffer("cnt", torch.tensor(1.0))

    def forward(self, x):
        self.cnt = self.cnt * 2
        return self.a(x) * self.cnt


def test_a_forward_that_assigns_a_buffer_is_refused():
    with pytest.raises(dcopt.TraceError, match="does not compute what the model computes"):
        dcopt.convert(AssignsABuffer(), (torch.randn(2, 4),))
