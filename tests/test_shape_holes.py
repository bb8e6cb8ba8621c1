"""Holes where a rule said "not a tracked tensor" for something that is one, or for a number
read from a group's width: each is now followed exactly, or the group is kept with a reason."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dcopt
from checks import assert_exact_export


def smallest(dm):
    return {g.name: dm.size_floor(g.name) for g in dm.plan.groups}


def exact_at_small_sizes(model, inputs, others):
    """convert → smallest sizes and half sizes → export, exact on ``inputs`` and ``others``."""
    dm = dcopt.convert(model, inputs)
    assert_exact_export(dm, inputs, smallest(dm), others=others)
    assert_exact_export(dm, inputs, {g.name: max(dm.size_floor(g.name), g.width // 2) for g in dm.plan.groups},
                        others=others)
    return dm


def assert_kept(model, inputs, others, group, word):
    """``group`` keeps its width, with a reason containing ``word``; the rest still exports exactly."""
    a = dcopt.analyze(model, inputs)
    g = a.group(group)
    assert g.status != "dynamic", g
    assert any(word in r for r in g.reasons), g.reasons
    exact_at_small_sizes(model, inputs, others)
    return g


# -- bug 4: attributes of a tracked tensor -----------------------------------------------

class Attr(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.c = nn.Conv1d(4, 12, 3, padding=1)
        # only the head this variant calls (an unused module would be counted apart)
        self.head = nn.Conv1d(12, 3, 1) if how == "mT_mT" else nn.Linear(12, 3)

    def forward(self, x):               # x: (B, 4, T)
        h = F.relu(self.c(x))           # (B, 12, T): features on dim 1
        if self.how == "values":        # global max-pool over time
            return self.head(h.max(dim=2).values)
        if self.how == "torch_max_values":
            return self.head(torch.max(h, 2).values)
        if self.how == "data":
            return self.head(h.data.mean(2))
        if self.how == "T":             # (B, 12) -> (12, B) -> (B, 12)
            return self.head(h.mean(2).T.T)
        if self.how == "mT":            # (B, 12, T) -> (B, T, 12)
            return self.head(h.mT)
        if self.how == "mT_mT":
            return self.head(h.mT.mT)
        if self.how == "real":          # an attribute dcopt has no rule for
            return self.head(h.mean(2).real)
        raise AssertionError(self.how)


X4 = (torch.randn(2, 4, 7),)
O4 = ((torch.randn(5, 4, 7),),)


@pytest.mark.parametrize("how", ["values", "torch_max_values", "data", "T", "mT", "mT_mT"])
def test_tensor_attributes_are_followed(how):
    dm = exact_at_small_sizes(Attr(how).eval(), X4, O4)
    assert dm.group_names == ["c"]


def test_unknown_tensor_attribute_keeps_the_group():
    assert_kept(Attr("real").eval(), X4, O4, "c", ".real")


# -- bug 5: a slice of split results -----------------------------------------------------

class TupleSlice(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)

    def forward(self, x):
        parts = torch.relu(self.a(x)).split(1, 0)
        if self.how == "tail":
            return self.b(torch.cat(parts[1:], 0))
        if self.how == "step":
            return self.b(torch.stack(parts[::2], 0))
        if self.how == "computed":      # an index that is not a literal
            return self.b(parts[x.size(0) - 2])
        raise AssertionError(self.how)


X5 = (torch.randn(3, 8),)
O5 = ((torch.randn(3, 8),),)


@pytest.mark.parametrize("how", ["tail", "step"])
def test_slice_of_split_results_is_followed(how):
    dm = exact_at_small_sizes(TupleSlice(how), X5, O5)
    assert dm.group_names == ["a"]


def test_computed_tuple_index_keeps_the_group():
    assert_kept(TupleSlice("computed"), X5, O5, "a", "index")


# -- bug 6: a reshape whose feature size is computed -------------------------------------

class Reshape(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16 * 3, 4) if how in ("computed", "minus_one") else nn.Linear(16, 4)

    def forward(self, x):               # x: (B, 3, 8)
        h = torch.relu(self.a(x))       # (B, 3, 16)
        B, T = x.size(0), x.size(1)
        if self.how == "computed":
            return self.b(h.reshape(B, T * 16))
        if self.how == "minus_one":     # reading batch and time stays allowed
            return self.b(h.reshape(B, -1))
        if self.how == "own_width":     # the width read from these features is recomputed
            b, t, c = h.shape
            return self.b(h.reshape(b * t, c).view(b, t, c))
        if self.how == "restore_shape":
            return self.b(torch.tanh(h.flatten(0, 1)).view(h.shape))
        if self.how == "view_as":
            return self.b(torch.tanh(h.flatten(0, 1)).view_as(h))
        if self.how == "view_as_other":  # the target is a tensor of another width
            return self.b(h.flatten(0, 1).view_as(x.repeat(1, 1, 2)))
        raise AssertionError(self.how)


X6 = (torch.randn(2, 3, 8),)
O6 = ((torch.randn(4, 3, 8),),)


def test_computed_reshape_size_keeps_the_group():
    assert_kept(Reshape("computed"), X6, O6, "a", "computes the size of the feature dimension")


@pytest.mark.parametrize("how", ["minus_one", "own_width", "restore_shape", "view_as"])
def test_reshape_to_read_or_inferred_sizes_is_followed(how):
    dm = exact_at_small_sizes(Reshape(how), X6, O6)
    assert dm.group_names == ["a"]


def test_view_as_a_tensor_of_another_width_keeps_the_group():
    assert_kept(Reshape("view_as_other"), X6, O6, "a", "view_as")


class MergedWidth(nn.Module):
    """A CRNN's conv features merged with the frequency dim, the merged size computed from
    the width read off the tensor: ``b, c, f, t = h.shape; h.reshape(b, t, c * f)``."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        if how == "conv1d":
            self.head = nn.Conv1d(8 * 5, 6, 1)
        elif how == "square":
            self.head = nn.Conv1d(8 * 8, 6, 1)
        else:
            self.gru = nn.GRU(8 * 5, 6, batch_first=True)

    def forward(self, x):               # x: (B, 1, 5, T)
        h = torch.relu(self.bn(self.conv(x)))
        b, c, f, t = h.shape
        if self.how == "channel_major":
            return self.gru(h.permute(0, 3, 1, 2).reshape(b, t, c * f))[0]
        if self.how == "frequency_major":
            return self.gru(h.permute(0, 3, 2, 1).reshape(b, t, f * c))[0]
        if self.how == "conv1d":
            return self.head(h.reshape(b, c * f, t))
        if self.how == "square":        # (f == c here) the width times itself is not a width times other dims
            return self.head(h.reshape(b, c * c, t))
        raise AssertionError(self.how)


XMERGED = (torch.randn(2, 1, 5, 7),)
OMERGED = ((torch.randn(3, 1, 5, 11),),)


@pytest.mark.parametrize("how", ["channel_major", "frequency_major", "conv1d"])
def test_width_times_other_dims_sizes_a_merged_reshape(how):
    dm = exact_at_small_sizes(MergedWidth(how), XMERGED, OMERGED)
    assert "conv" in dm.group_names


def test_width_times_itself_keeps_the_group():
    a = dcopt.analyze(MergedWidth("square"), (torch.randn(2, 1, 8, 7),))
    assert a.group("conv").status != "dynamic"
    assert any("uses it as a number" in r for r in a.group("conv").reasons), a.group("conv").reasons


class WidthTwice(nn.Module):
    """One width read off the features fills two entries of a target size: the second
    sizes a dim without features, which the export would not recompute (the model runs
    at other T: ``[..., :t]``)."""

    def __init__(self, scaled):
        super().__init__()
        self.scaled = scaled
        self.conv = nn.Conv2d(1, 4, 3, padding=1) if scaled else nn.Conv1d(1, 8, 3, padding=1)
        self.head = nn.Conv1d(8, 3, 1)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        if self.scaled:
            b, c, f, t = h.shape
            n = c * f
            h = h.reshape(b, n, t)
        else:
            b, n, t = h.shape
        return self.head(h.mean(2, keepdim=True).expand(b, n, n)[..., :t]).sum(-1)


@pytest.mark.parametrize("scaled", [False, True])
def test_a_width_filling_two_entries_keeps_the_group(scaled):
    ex = (torch.randn(2, 1, 2, 2),) if scaled else (torch.randn(2, 1, 2),)
    a = dcopt.analyze(WidthTwice(scaled), ex)
    assert a.group("conv").status != "dynamic"
    assert any("uses it as a number" in r for r in a.group("conv").reasons), a.group("conv").reasons


class ClassToken(nn.Module):
    """A class token (a parameter expanded to the batch) joined before the frames on the
    time dim: it holds the same features, so it is sliced with the frames' group."""

    def __init__(self, how, d=16):
        super().__init__()
        self.how = how
        self.patch = nn.Linear(8, d)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.scale = nn.Parameter(torch.randn(1, 1, d))
        self.mlp = nn.Sequential(nn.Linear(d, 24), nn.ReLU(), nn.Linear(24, d))
        self.bn = nn.BatchNorm1d(d)
        self.head = nn.Linear(d, 3)
        if how == "also_attended":
            self.att = nn.MultiheadAttention(d, 2, batch_first=True)

    def forward(self, x):
        h = self.patch(x) * self.scale.expand(x.size(0), x.size(1), -1)   # expanded, elementwise
        c = self.cls.expand(h.shape[0], 1, 16) if self.how == "literal" else self.cls.expand(h.shape[0], -1, -1)
        h = torch.cat([c, h], 1)
        h = h + self.mlp(h)
        y = self.head(self.bn(h[:, 0]))
        if self.how == "also_attended":   # the token read whole by a layer: it keeps its shape
            y = y + self.att(c, c, c, need_weights=False)[0][:, 0, :3]
        return y


XCLS = (torch.randn(2, 10, 8),)
OCLS = ((torch.randn(3, 6, 8),),)


def test_class_token_is_sliced_with_the_frames():
    dm = exact_at_small_sizes(ClassToken("plain"), XCLS, OCLS)
    assert "patch" in dm.group_names
    dm.set_sizes({"patch": 5})
    small = dcopt.export(dm)
    assert small.cls.shape == (1, 1, 5) and small.scale.shape == (1, 1, 5)


@pytest.mark.parametrize("how, word", [("literal", "joined with expand"),
                                       ("also_attended", "also read by MultiheadAttention")])
def test_class_token_that_cannot_follow_keeps_the_group(how, word):
    assert_kept(ClassToken(how), XCLS, OCLS, "patch", word)


class BroadcastParam(nn.Module):
    """One value broadcast along the features by expand (a (1, 1, 1) scale grown to
    (B, T, 8)): no entry of it belongs to a feature, so it cannot be sliced with them."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.s = nn.Parameter(torch.randn(1, 1, 1))
        self.o = nn.Linear(8, 3)

    def forward(self, x):
        return self.o(self.a(x) * self.s.expand(x.size(0), x.size(1), 8))


def test_parameter_broadcast_along_the_features_keeps_the_group():
    assert_kept(BroadcastParam(), (torch.randn(2, 5, 6),), ((torch.randn(3, 7, 6),),), "a", "meets a fixed-width")


class Unflatten(nn.Module):
    """unflatten of the time dim, not of the features: nothing to rewrite."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv1d(4, 6, 1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):               # (B, 4, 12)
        return self.head(self.c(x).unflatten(2, (3, 4)))


def test_unflatten_of_another_dim_is_not_rewritten():
    dm = exact_at_small_sizes(Unflatten(), (torch.randn(2, 4, 12),), ((torch.randn(3, 4, 12),),))
    assert dm.group_names == ["c"]


# -- bug 7: a number read from the feature width -----------------------------------------

class ShapeScalar(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)
        if how == "index":
            self.c = nn.Linear(16, 4)

    def forward(self, x):               # x: (B, 16)
        h = torch.relu(self.a(x[:, :8]))
        if self.how == "shape_scale":   # attention-like 1/sqrt(d)
            return self.b(h * h.shape[-1] ** -0.5)
        if self.how == "size_div":
            return self.b(h) / h.size(1)
        if self.how == "numel":
            return self.b(h) / h.numel()
        if self.how == "unpacked":
            n, d = h.size()
            return self.b(h) * d
        if self.how == "index":         # slices another tensor by the width
            return self.b(h) + self.c(x[:, :h.size(1)])
        if self.how == "arange":
            return self.b(h + torch.arange(h.size(-1)))
        if self.how == "batch":         # reading the batch size stays allowed
            return self.b(h.view(h.size(0), -1)) / h.shape[0]
        if self.how == "unpacked_unused":
            n, d = h.size()
            return self.b(h.view(n, d))
        raise AssertionError(self.how)


X7 = (torch.randn(3, 16),)
O7 = ((torch.randn(5, 16),),)


@pytest.mark.parametrize("how", ["shape_scale", "size_div", "numel", "unpacked", "index", "arange"])
def test_reading_the_feature_width_keeps_the_group(how):
    g = assert_kept(ShapeScalar(how), X7, O7, "a", "reads the width of the features")
    assert any("test_shape_holes.py:" in r for r in g.reasons), g.reasons


@pytest.mark.parametrize("how", ["batch", "unpacked_unused"])
def test_reading_other_dims_or_recomputed_width_is_followed(how):
    dm = exact_at_small_sizes(ShapeScalar(how), X7, O7)
    assert dm.group_names == ["a"]


# -- bug 8: a tied weight read through a shape op ----------------------------------------

class Tied(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.e = nn.Embedding(20, 16)
        self.lin = nn.Linear(16, 16)

    def forward(self, t):
        h = torch.tanh(self.lin(self.e(t)))
        w = self.e.weight
        if self.how == "t":
            return h @ w.t()
        if self.how == "T":
            return h @ w.T
        if self.how == "mT":
            return torch.matmul(h, w.mT)
        if self.how == "transpose":
            return h @ w.transpose(0, 1)
        if self.how == "data_t":
            return h @ w.data.t()
        if self.how == "view":
            return h @ w.view(20, 16).permute(1, 0)
        if self.how == "linear":        # rejected before: the reference behaviour
            return F.linear(h, w)
        raise AssertionError(self.how)


XT = (torch.randint(0, 20, (2, 5)),)
OT = ((torch.randint(0, 20, (3, 4)),),)


@pytest.mark.parametrize("how", ["t", "T", "mT", "transpose", "data_t", "view", "linear"])
def test_tied_weight_through_a_shape_op_keeps_its_group(how):
    assert_kept(Tied(how), XT, OT, "e", "e.weight")


class UnflattenModule(nn.Module):
    """nn.Unflatten holds the feature width in an attribute export does not rewrite."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.u = nn.Unflatten(1, (16, 1))
        self.b = nn.Conv1d(16, 4, 1)
        self.c = nn.Linear(8, 16)

    def forward(self, x):
        return self.b(self.u(torch.relu(self.a(x)))) + self.c(x).sum()


def test_unflatten_module_holding_the_width_keeps_the_group():
    x = torch.randn(3, 8)
    assert_kept(UnflattenModule(), (x,), ((torch.randn(5, 8),),), "a", "unflattened_size")


# -- a rank that depends on the input's shape ---------------------------------------------

class SqueezeAll(nn.Module):
    """``h.squeeze()`` removes the batch dim of a batch of 1 and keeps it otherwise."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 12), nn.Linear(12, 4)

    def forward(self, x):
        h = self.a(x).relu().squeeze()
        return self.c(self.b(h).relu())


@pytest.mark.parametrize("batch", [3, 16])
def test_a_gate_traced_on_a_squeezed_batch_of_one_refuses_other_batches(batch):
    """Converted on a batch of 1, the gate after ``squeeze()`` sits on dim 0 of a rank-1
    tensor. A batch of 16 has 16 rows on dim 0 as well: without the rank check the gate
    zeroed batch rows instead of features, silently (the export slices features, so the
    two differed). Now any batch but 1 stops with a TraceError naming the line."""
    dm = dcopt.convert(SqueezeAll(), (torch.randn(1, 8),))
    dm.set_sizes(smallest(dm))
    dm.eval()
    with pytest.raises(dcopt.TraceError, match="rank 1.*batch of 1") as err:
        dm(torch.randn(batch, 8))
    assert "test_shape_holes.py" in str(err.value)
    # converted on data-shaped inputs the same model trains and exports exactly
    exact_at_small_sizes(SqueezeAll(), (torch.randn(4, 8),), [(torch.randn(16, 8),)])


# -- expand with the feature dim's size written in the call --------------------------------

class ExpandGate(nn.Module):
    """A per-channel gate from a Linear, broadcast over time by expand."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a, self.b, self.p = nn.Conv1d(4, 16, 1), nn.Conv1d(16, 4, 1), nn.Linear(4, 16)
        if how == "expand_as_fixed":
            self.fixed = nn.Conv1d(4, 16, 1)

    def forward(self, x):
        h = self.a(x)                                   # B, 16, T
        g = self.p(x.mean(2)).unsqueeze(2)              # B, 16, 1
        B, T = x.shape[0], x.shape[2]
        if self.how == "literal":
            g = g.expand(B, 16, T)
        elif self.how == "tuple":
            g = g.expand((B, 16, T))
        elif self.how == "minus_one":
            g = g.expand(-1, -1, T)
        elif self.how == "read":
            g = g.expand(B, g.size(1), T)
        elif self.how == "broadcast_to":
            g = torch.broadcast_to(g, (B, 16, T))
        elif self.how == "computed":
            g = g.expand(B, 4 * x.size(1), T)
        elif self.how == "expand_as":
            g = g.expand_as(g.repeat(1, 1, T))
        elif self.how == "expand_as_fixed":
            g = g.expand_as(self.fixed(x))
        return self.b(torch.sigmoid(g) * h)


@pytest.mark.parametrize("how", ["literal", "tuple", "minus_one", "read", "broadcast_to", "expand_as"])
def test_expand_follows_the_kept_width(how):
    """A literal 16 in expand was left as it was: the export asked a sliced gate for 16
    channels and crashed ("The expanded size of the tensor (16) must match ... (8)")."""
    torch.manual_seed(0)
    dm = exact_at_small_sizes(ExpandGate(how), (torch.randn(2, 4, 10),), [(torch.randn(3, 4, 7),)])
    assert dm.plan.groups[0].width == 16


@pytest.mark.parametrize("how, word", [("computed", "computes the size"), ("expand_as_fixed", "expand_as")])
def test_expand_to_a_size_it_cannot_follow_keeps_the_group(how, word):
    torch.manual_seed(0)
    assert_kept(ExpandGate(how), (torch.randn(2, 4, 10),), [(torch.randn(3, 4, 7),)], "p", word)


# -- a slice of features flattened with another dim -----------------------------------------

class SliceFlattened(nn.Module):
    """The CRNN step (B, C, H, W) → (B, W, C·H), then a literal slice of that dim."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(2, 5, 3, padding=1), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.cat([self.conv(x), x], 1)
        return self.fc(h.permute(0, 3, 1, 2).flatten(2)[..., 17:21]).mean(1)


def test_a_slice_of_features_flattened_with_another_dim_keeps_the_group():
    """Which (channel, row) pairs the bounds 17:21 pick depends on H. Export rewrote them
    for the example's H, and at H=5 (which the model accepts) it differed silently from
    the gated model (relative error ~0.8)."""
    torch.manual_seed(0)
    g = assert_kept(SliceFlattened(), (torch.randn(2, 2, 3, 4),), [(torch.randn(2, 2, 5, 4),)], "conv",
                    "several times")
    assert g.status == "rejected"
