"""In-place ops, models that change their inputs, forward hooks, models torch cannot copy.

The traced graph is made functional (dcopt/inplace.py): an in-place op becomes its
out-of-place twin and every later reader of the changed tensor reads it, so gates (which
copy their input) and export's dead-code elimination see what the program did through
memory. What cannot be rewritten exactly, and hooks fx would drop, are a TraceError.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as prune
from torch import nn

import dcopt
from checks import assert_exact_export
from dcopt.trace import trace

X = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
OTHER = (torch.randn(5, 8, generator=torch.Generator().manual_seed(1)),)

#: in-place ops whose result the forward does not reassign: `h` is read afterwards
VARIANTS = {
    "method": lambda h: h.relu_(),
    "torch_function": lambda h: torch.relu_(h),
    "clamp": lambda h: h.clamp_(0, 0.5),
    "functional_inplace_kwarg": lambda h: F.relu(h, inplace=True),
    "functional_inplace_positional": lambda h: F.hardtanh(h, -0.5, 0.5, True),
    "functional_underscore": lambda h: F.elu_(h),
    "chained": lambda h: h.mul_(2).add_(1),
    "sub_abs": lambda h: h.sub_(0.1).abs_(),
}


class _TwoLayers(nn.Module):
    def __init__(self, op, relu=None):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)
        self.op = op
        if relu is not None:
            self.relu = relu

    def forward(self, x):
        h = self.a(x)
        if self.op is None:
            self.relu(h)         # nn.ReLU(inplace=True), result not reassigned
        else:
            self.op(h)
        return self.b(h)


def _removed(model, keep):
    """The user's model with features keep.. of `a` removed (b's columns zeroed)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.b.weight[:, keep:] = 0
    return ref.eval()


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_unassigned_inplace_op_is_kept_at_reduced_width(name):
    torch.manual_seed(0)
    model = _TwoLayers(VARIANTS[name]).eval()
    dm = dcopt.convert(model, (X,))
    assert dm.analysis.group("a").status == "dynamic"
    with torch.no_grad():
        assert torch.allclose(dm.eval()(X), model(X.clone()), atol=1e-6)   # full width: the user's model
    small = assert_exact_export(dm, (X,), {"a": 5}, others=(OTHER,))
    with torch.no_grad():
        for x in (X, OTHER[0]):
            assert torch.allclose(small(x.clone()), _removed(model, 5)(x.clone()), atol=1e-6), name


def test_inplace_module_result_not_reassigned():
    torch.manual_seed(0)
    model = _TwoLayers(None, nn.ReLU(inplace=True)).eval()
    dm = dcopt.convert(model, (X,))
    small = assert_exact_export(dm, (X,), {"a": 3}, others=(OTHER,))
    with torch.no_grad():
        assert torch.allclose(small(X.clone()), _removed(model, 3)(X.clone()), atol=1e-6)
    assert model.relu.inplace   # the user's module is not changed


def test_traced_graph_is_functional():
    torch.manual_seed(0)
    for name, op in VARIANTS.items():
        gm = trace(_TwoLayers(op), (X,)).gm
        left = [n.target for n in gm.graph.nodes if n.op == "call_method" and n.target.endswith("_")]
        assert not left, (name, left)
        assert not any(n.kwargs.get("inplace") for n in gm.graph.nodes), name


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        h = self.c1(x)
        out = self.c2(torch.relu(h))
        out.add_(h)                  # residual written in place, result not reassigned
        return self.c3(out)


def test_inplace_residual_add():
    torch.manual_seed(0)
    model = _Residual().eval()
    x = torch.randn(2, 3, 6, 6)
    dm = dcopt.convert(model, (x,))
    assert dm.group_names == ["c1"]
    small = assert_exact_export(dm, (x,), {"c1": 4}, others=((torch.randn(1, 3, 5, 7),),))
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.c2.weight[:, 4:] = 0     # channels 4.. of the coupled group removed everywhere
        ref.c3.weight[:, 4:] = 0
        assert torch.allclose(small(x), ref(x), atol=1e-5)


class _OutputInplace(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)

    def forward(self, x):
        out = self.b(torch.relu(self.a(x)))
        out.sigmoid_()               # on the output, result unused: export must keep it
        return out


def test_inplace_op_on_the_output_survives_export():
    torch.manual_seed(0)
    model = _OutputInplace().eval()
    dm = dcopt.convert(model, (X,))
    small = assert_exact_export(dm, (X,), {"a": 6}, others=(OTHER,))
    with torch.no_grad():
        assert (small(X) > 0).all()  # the sigmoid is there


class _CopyInto(nn.Module):
    """copy_ has no out-of-place twin: it runs on a clone, and the analysis (no rule for
    copy_) keeps the group it reaches fixed."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)
        self.c = nn.Linear(8, 6)
        self.d = nn.Linear(6, 4)

    def forward(self, x):
        h = self.a(x)
        h.copy_(h.flip(1))
        return self.b(h) + self.d(torch.relu(self.c(x)))


def test_inplace_op_without_twin_is_exact_and_rejected():
    torch.manual_seed(0)
    model = _CopyInto().eval()
    dm = dcopt.convert(model, (X,))
    group = dm.analysis.group("a")
    assert group.status != "dynamic" and any("copy_" in r for r in group.reasons)
    assert dm.analysis.group("c").status == "dynamic"
    with torch.no_grad():
        assert torch.allclose(dm.eval()(X), model(X.clone()), atol=1e-6)
    assert_exact_export(dm, (X,), {"c": 2}, others=(OTHER,))


class _ViewMutated(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)

    def forward(self, x):
        h = self.a(x)
        h[:, :4].relu_()             # changes h through a view; h is read below
        return self.b(h)


class _ParamMutated(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)
        self.w = nn.Parameter(torch.ones(16))

    def forward(self, x):
        self.w.mul_(0.5)             # the model changes its own parameter on every call
        return self.b(self.a(x) * self.w)


@pytest.mark.parametrize("cls, word", [(_ViewMutated, "share memory"), (_ParamMutated, "parameter")])
def test_inplace_op_that_cannot_be_rewritten_is_a_trace_error(cls, word):
    model = cls()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for run in (lambda: dcopt.convert(model, (X,)), lambda: dcopt.analyze(model, (X,))):
        with pytest.raises(dcopt.TraceError, match=word) as info:
            run()
        assert info.value.location and info.value.location.startswith(__file__)
        assert "out of place" in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_view_mutated_is_exact_when_its_base_is_not_read_again():
    class ViewOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 16)
            self.b = nn.Linear(16, 4)

        def forward(self, x):
            v = self.a(x).view(-1, 4, 4)
            v.relu_()
            return self.b(v.flatten(1))

    torch.manual_seed(0)
    model = ViewOnly().eval()
    dm = dcopt.convert(model, (X,))
    with torch.no_grad():
        assert torch.allclose(dm.eval()(X), model(X.clone()), atol=1e-6)
    assert_exact_export(dm, (X,), {g: 1 for g in dm.group_names}, others=(OTHER,))


class _InputMutated(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)

    def forward(self, x):
        x.mul_(2.0)
        return self.b(torch.relu(self.a(x)))


def test_model_that_changes_its_input_exports_and_leaves_the_example_inputs_alone():
    torch.manual_seed(0)
    model = _InputMutated().eval()
    x = torch.randn(3, 8)
    kept = x.clone()
    dm = dcopt.convert(model, (x,))
    dm.set_sizes({"a": 8})
    dcopt.export(dm)              # its check runs the gated and the exported model on x
    assert torch.equal(x, kept) and dm.example_inputs[0] is x
    # (the exported model may be the user's class, which doubles its input: give it copies)
    assert_exact_export(dm, (x.clone(),), others=((torch.randn(2, 8),),))
    dm.set_sizes({"a": 16})
    with torch.no_grad():
        assert torch.allclose(dm.eval()(x), model(x.clone()), atol=1e-6)
    assert torch.equal(x, kept)   # the graph no longer changes x


def test_shape_propagation_on_real_tensors_copies_the_inputs():
    class Doubling(nn.Module):    # a user leaf: the graph cannot see that it changes its input
        def forward(self, x):
            return x.mul_(2.0)

    class WithLeaf(nn.Module):
        def __init__(self):
            super().__init__()
            self.leaf = Doubling()
            self.a = nn.Linear(8, 4)

        def forward(self, x):
            return self.a(self.leaf(x))

    x = torch.randn(3, 8)
    kept = x.clone()
    traced = trace(WithLeaf(), (x,), leaf_modules=[Doubling])
    assert traced.gm.meta["shape_propagation"].startswith("real tensors")
    assert torch.equal(x, kept)


# -- hooks and models torch cannot copy --------------------------------------------------

class _Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.block = nn.Sequential(nn.Linear(16, 16), nn.ReLU())
        self.b = nn.Linear(16, 4)

    def forward(self, x):
        return self.b(self.block(torch.relu(self.a(x))))


def _hook_on_leaf(m):
    return m.a.register_forward_hook(lambda mod, i, o: o * 2)


def _pre_hook_on_traced_module(m):
    return m.block.register_forward_pre_hook(lambda mod, i: (i[0] * 2,))


@pytest.mark.parametrize("add_hook, module", [(_hook_on_leaf, "a"), (_pre_hook_on_traced_module, "block")])
def test_forward_hooks_are_a_trace_error(add_hook, module):
    model = _Plain()
    handle = add_hook(model)
    for run in (lambda: dcopt.convert(model, (X,)), lambda: dcopt.analyze(model, (X,))):
        with pytest.raises(dcopt.TraceError, match="hook") as info:
            run()
        assert info.value.module == module and ".remove()" in str(info.value)
    assert len(handle.hooks_dict_ref()) == 1   # dcopt left the user's hook where it was
    handle.remove()
    dcopt.convert(model, (X,))


def test_global_forward_hook_is_a_trace_error():
    handle = nn.modules.module.register_module_forward_hook(lambda mod, i, o: None)
    try:
        with pytest.raises(dcopt.TraceError, match="globally"):
            dcopt.convert(_Plain(), (X,))
    finally:
        handle.remove()


def _pruned():
    model = _Plain()
    prune.l1_unstructured(model.a, "weight", amount=0.3)
    return model


def _weight_normed():
    model = _Plain()
    with pytest.warns(FutureWarning):
        torch.nn.utils.weight_norm(model.a)
    return model


@pytest.mark.parametrize("build, advice", [(_pruned, "prune.remove"), (_weight_normed, "remove_weight_norm")])
def test_prune_and_old_weight_norm_get_a_clear_error(build, advice):
    model = build()
    for run in (lambda: dcopt.convert(model, (X,)), lambda: dcopt.analyze(model, (X,))):
        with pytest.raises(dcopt.TraceError, match=advice):
            run()


def test_a_model_torch_cannot_deepcopy_is_a_trace_error():
    with pytest.raises(dcopt.TraceError, match="prune.remove") as info:
        trace(_pruned(), (X,), allow_hooks=True)   # past the hook check: the copy fails
    assert "a.weight" in str(info.value)

    class Computed(_Plain):
        def __init__(self):
            super().__init__()
            self.scaled = self.a.weight * 2    # a computed tensor kept as a plain attribute

    with pytest.raises(dcopt.TraceError, match="scaled"):
        dcopt.convert(Computed(), (X,))


class HalfAddsFloat(nn.Module):
    """``h.add_(bias32)`` keeps h float16; its out-of-place twin would promote to float32."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16).half(), nn.Linear(16, 4).half()
        self.register_buffer("bias32", torch.randn(16))

    def forward(self, x):
        h = self.a(x)
        h.add_(self.bias32)
        return self.b(h.relu())


def test_an_in_place_op_keeps_its_dtype_after_functionalization():
    torch.manual_seed(0)
    model, x = HalfAddsFloat(), torch.randn(3, 8).half()
    dm = dcopt.convert(model, (x,))
    dm.eval()
    with torch.no_grad():
        assert dm(x).dtype == model(x).dtype == torch.float16
        torch.testing.assert_close(dm(x), model(x))
        dm.set_sizes({g: dm.size_floor(g) for g in dm.group_names})
        small = dcopt.export(dm)
        assert small(x).dtype == torch.float16
        torch.testing.assert_close(small(x), dm(x))
