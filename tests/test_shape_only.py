"""Shapes-only propagation (convs and linears on meta tensors, zeros after them) gives the
shapes, dtypes and MACs the real run gives, and falls back to the real run wherever a
value could reach a shape."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import dcopt
from dcopt.shape_only import node_shapes, shapes_only_safe
from dcopt.trace import propagate_shapes, trace
from models import CASES, build

pytestmark = pytest.mark.usefixtures("one_thread")


def _both(model, inputs):
    """(macs, shapes, which run) of the default propagation and of the real reference."""
    gm = trace(model, inputs).gm
    fast = propagate_shapes(gm, inputs), node_shapes(gm), gm.meta["shape_propagation"]
    real = propagate_shapes(gm, inputs, count_all=True), node_shapes(gm), gm.meta["shape_propagation"]
    return fast, real


@pytest.mark.parametrize("name", sorted(CASES))
def test_test_models_same_shapes_and_macs(name):
    fast, real = _both(*build(name))
    assert fast[0] == real[0] and fast[1] == real[1]
    assert real[2].startswith("real tensors")


def test_conv_and_linear_nets_take_the_shapes_only_run():
    for name in ("mlp", "conv_bn_flatten", "residual", "dense_concat", "depthwise_separable"):
        fast, _ = _both(*build(name))
        assert fast[2] == "shapes only", (name, fast[2])


class _ConvStack(nn.Module):
    def __init__(self, dims, layers, head):
        super().__init__()
        self.convs = nn.ModuleList(layers)
        self.dims = dims
        self.head = head

    def forward(self, x):
        for conv in self.convs:
            x = F.relu(conv(x))
        return self.head(x.flatten(1))


@st.composite
def conv_stacks(draw):
    dims = draw(st.sampled_from([1, 2, 3]))
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    size = draw(st.integers(6 if dims == 3 else 9, 8 if dims == 3 else 16))
    channels = draw(st.integers(1, 4))
    layers = []
    for _ in range(draw(st.integers(1, 3))):
        out = draw(st.sampled_from([2, 4, 6]))
        groups = draw(st.sampled_from([g for g in (1, 2) if channels % g == 0 and out % g == 0]))
        k = draw(st.integers(1, 3))
        dilation = draw(st.integers(1, 2))
        stride = draw(st.integers(1, 2))
        if stride == 1 and draw(st.booleans()):
            padding = "same"
        else:
            padding = draw(st.integers(0, 1))
        mode = draw(st.sampled_from(["zeros", "reflect", "circular", "replicate"]))
        if mode != "zeros" and padding != "same" and padding >= size:
            mode = "zeros"
        layers.append(conv(channels, out, k, stride=stride, padding=padding, dilation=dilation, groups=groups,
                           padding_mode=mode, bias=draw(st.booleans())))
        channels = out
        size = (size + 2 * (0 if padding == "same" else padding) - dilation * (k - 1) - 1) // stride + 1 \
            if padding != "same" else size
        if size < 3:
            break
    x = torch.randn(draw(st.integers(1, 3)), layers[0].in_channels, *([draw(st.integers(6, 12))] * dims))
    with torch.no_grad():
        try:
            flat = nn.Sequential(*[nn.Sequential(c, nn.ReLU()) for c in layers])(x).flatten(1).shape[1]
        except RuntimeError:
            return None     # the drawn input is too small for the drawn stack
    return _ConvStack(dims, layers, nn.Linear(flat, draw(st.integers(1, 5)))).eval(), (x,)


# torch's own note on padding='same' with an even kernel (a padded copy); some drawn stacks have one
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@settings(max_examples=40, deadline=None)
@given(conv_stacks())
def test_random_conv_stacks_same_shapes_and_macs(case):
    if case is None:
        return
    fast, real = _both(*case)
    assert fast[2] == "shapes only"
    assert fast[0] == real[0] and fast[1] == real[1]


# -- where a value could reach a shape, the real run is taken -----------------------------

class _AfterConv(nn.Module):
    """A conv, then ``tail`` on its output: zeros instead of the real output would change
    what ``tail`` returns."""

    def __init__(self, tail):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3)
        self.tail = tail

    def forward(self, x):
        return self.tail(self.conv(x))


def _nonzero(y):
    return torch.nonzero(y > 0)


def _mask(y):
    return y[y > 0]


def _assert_tensor(y):
    torch._assert(y.sum() != 0, "all zero")
    return y


def _cholesky(y):
    z = y.flatten(1)
    return torch.linalg.cholesky(z @ z.T + 1e-3 * torch.eye(z.shape[0]) * (z.abs().sum() > 0))


@pytest.mark.parametrize("tail", [_nonzero, _mask, _assert_tensor, _cholesky])
def test_value_dependent_tails_fall_back_to_real_tensors(tail):
    torch.manual_seed(0)
    x = torch.randn(2, 2, 9)
    model = _AfterConv(tail).eval()
    with torch.no_grad():
        expected = model(x)
    gm = trace(model, (x,)).gm
    assert gm.meta["shape_propagation"].startswith("real tensors (abandoned the shapes-only run")
    out = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
    assert tuple(out.meta["tensor_meta"].shape) == tuple(expected.shape)


class _Tolist(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3)

    def forward(self, x):
        return x, self.conv(x).tolist()


class _UserLeaf(nn.Module):
    def forward(self, x):
        return x[: int((x > 0).sum().item()) or 1]


class _WithLeaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3)
        self.leaf = _UserLeaf()

    def forward(self, x):
        return self.leaf(self.conv(x))


def test_values_out_of_the_dispatcher_or_in_user_code_are_never_run_shapes_only():
    x = torch.randn(2, 2, 9)
    gm = trace(_Tolist().eval(), None).gm
    assert "tolist" in shapes_only_safe(gm, dict(gm.named_modules()))
    model = _WithLeaf().eval()
    traced = trace(model, (x,), leaf_modules=[_UserLeaf])
    assert "_UserLeaf" in traced.gm.meta["shape_propagation"]
    with torch.no_grad():
        expected = model(x)
    out = [n for n in traced.gm.graph.nodes if n.op == "output"][0].args[0]
    assert tuple(out.meta["tensor_meta"].shape) == tuple(expected.shape)


def test_hooks_keep_the_real_run():
    model = _AfterConv(nn.ReLU()).eval()
    handle = model.conv.register_forward_hook(lambda m, i, o: o)
    gm = trace(model, (torch.randn(2, 2, 9),), allow_hooks=True).gm
    assert "hook" in gm.meta["shape_propagation"]
    handle.remove()


def test_a_width_mismatch_still_raises_a_trace_error():
    class Wrong(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(3, 4, 3)      # the input has 2 channels

        def forward(self, x):
            return self.conv(x)

    with pytest.raises(dcopt.TraceError, match="running the model on the example inputs failed"):
        trace(Wrong().eval(), (torch.randn(2, 2, 9),))


def test_in_place_ops_do_not_change_the_users_inputs():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(2, 3, 3)

        def forward(self, x):
            x.mul_(2)
            y = self.conv(x)
            return y[y > 0]             # abandons the shapes-only run: the real run follows

    x = torch.randn(2, 2, 9)
    before = x.clone()
    trace(InPlace().eval(), (x,))
    assert torch.equal(x, before)       # the graph is functional and the real run copies its inputs


def test_value_blind_watches_tensors_in_size_positions():
    import operator

    from dcopt.shape_only import value_blind

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    t, ints = torch.ones(2, dtype=torch.long), (1, 1)

    def node(op, target):
        return graph.create_node(op, target, (x,))

    assert value_blind(node("call_function", operator.add), None, (t, t), {})            # operands
    assert value_blind(node("call_function", torch.split), None, (t, 1), {})
    assert not value_blind(node("call_function", torch.split), None, (t, t), {})        # sizes from values
    assert value_blind(node("call_function", operator.getitem), None, (t, (slice(None), 0)), {})
    assert not value_blind(node("call_function", operator.getitem), None, (t, t > 0), {})
    assert value_blind(node("call_method", "view"), None, (t, ints), {})
    assert not value_blind(node("call_method", "view"), None, (t, t), {})
    assert not value_blind(node("call_function", torch.nonzero), None, (t,), {})       # not listed: watched
    assert value_blind(node("call_module", "conv"), nn.Conv1d(2, 2, 1), (t,), {})
    assert not value_blind(node("call_module", "mha"), nn.MultiheadAttention(4, 1), (t,), {})
