"""Functionalization: the in-place ops of a traced graph become out-of-place ops.

Why: everything after tracing treats a node's value as fixed once computed. A gate is
inserted right after the tensor it gates and copies it (``torch.where``), so an in-place
op that runs later (``h.relu_()``, ``out.add_(identity)``) changes the original but not
what the consumer behind the gate reads; and export's dead-code elimination deletes an
in-place node whose result nobody reads (``out.sigmoid_()`` before ``return out``). Both
gave a silently different model. After :func:`functionalize` the mutation is a node of
its own and every later reader of the mutated tensor reads that node, so the graph says
in its edges what the program did through memory.

How, for an in-place op ``I`` on tensor ``a`` (nodes in graph order):

* a Tensor method ``relu_``, ``add_``, ``clamp_`` ... becomes its twin without the
  trailing ``_``; ``torch.relu_`` / ``F.elu_`` ... their out-of-place function;
  ``operator.iadd`` ... ``operator.add``; ``F.relu(x, inplace=True)`` ...
  ``inplace=False``. An op with no exact twin (``fill_``, ``copy_``, ``zero_``, the random
  fills, comparisons that would return ``bool`` out of place) runs on a fresh
  ``a.clone()`` instead: the same op on a tensor no one else sees.
* a torch activation module built with ``inplace=True`` (``nn.ReLU(inplace=True)``,
  torchvision's convention) stays as it is: it returns ``a`` itself, so the rewiring
  below is exact without changing the module (which ``analyze`` shares with the user).
* every use of ``a`` *after* ``I`` (graph order) reads ``I`` instead.
* a twin whose result has another dtype than ``a`` (type promotion, which the in-place
  op does not do) is cast back once shapes are known (:func:`restore_dtypes`).

That is exact as long as nothing else shares ``a``'s memory. :func:`functionalize`
raises :class:`~dcopt.TraceError` (naming the op and the user's line) when it cannot
show that: ``a`` is (a view of) a parameter or buffer — the model changes its own state
on every call —, or a tensor that may share memory with ``a`` (a view of it, its base,
another view of that base, the output of a module or function that may return its input)
is read after ``I``. A typed error rather than a rejection: the analysis can only keep
the groups of an op's own arguments fixed, and an aliasing tensor may carry other
groups whose gates would still copy it before the mutation; the fix on the user's side
is one line (write the op out of place, or ``.clone()`` first). Which ops may return a
view is decided by name (:data:`VIEW_METHODS`, :data:`VIEW_FUNCTIONS`); a module or a
function dcopt does not know is assumed to possibly return its inputs.

The caller's input tensors are no longer changed by a functionalized graph (``x.mul_(2)``
on an input becomes ``x.mul(2)``): the outputs are the same, the side effect is gone.
"""
from __future__ import annotations

import builtins
import inspect
import operator
import types
from typing import Any, Optional

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .errors import TraceError, source_location

__all__ = ["functionalize", "restore_dtypes", "VIEW_METHODS", "VIEW_FUNCTIONS"]

#: node.meta key: the name of the tensor an out-of-place twin's in-place op wrote into
_TWIN_OF = "dcopt_inplace_twin_of"

#: Tensor methods whose result may share memory with ``self`` (views, and the
#: conversions that return ``self`` when there is nothing to convert).
VIEW_METHODS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze",
    "transpose", "permute", "t", "movedim", "moveaxis", "swapaxes", "swapdims", "narrow", "select",
    "expand", "expand_as", "broadcast_to", "split", "split_with_sizes", "chunk", "unbind", "tensor_split",
    "hsplit", "vsplit", "dsplit", "unfold", "diagonal", "as_strided", "detach", "contiguous", "to", "type",
    "type_as", "float", "double", "half", "bfloat16", "int", "long", "short", "bool", "byte", "char", "cpu",
    "cuda", "real", "imag", "view_as_real", "view_as_complex", "conj", "resolve_conj", "resolve_neg",
    "indices", "values", "align_to", "align_as", "rename", "refine_names", "sum_to_size", "adjoint",
    "__getitem__", "requires_grad_", "coalesce", "to_dense",
})

#: Functions whose result may share memory with their first argument.
VIEW_FUNCTIONS = frozenset({
    operator.getitem, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.transpose,
    torch.permute, torch.t, torch.movedim, torch.moveaxis, torch.swapaxes, torch.swapdims, torch.narrow,
    torch.select, torch.split, torch.chunk, torch.unbind, torch.tensor_split, torch.hsplit, torch.vsplit,
    torch.dsplit, torch.diagonal, torch.as_strided, torch.detach, torch.broadcast_to, torch.broadcast_tensors,
    torch.atleast_1d, torch.atleast_2d, torch.atleast_3d, torch.view_as_real, torch.view_as_complex,
    torch.real, torch.imag, torch.conj, torch.resolve_conj, torch.resolve_neg, torch.adjoint, torch.unflatten,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    torch.dropout, torch.alpha_dropout, torch.feature_dropout, torch.feature_alpha_dropout,
})

#: tensor attributes (``x.T``, read through ``getattr``) that are views
_VIEW_ATTRS = frozenset({"T", "mT", "H", "mH", "data", "real", "imag"})

#: torch modules whose output may be their input (Dropout returns it in eval mode)
_VIEW_MODULES: tuple[type, ...] = (nn.Identity, nn.Flatten, nn.Unflatten, nn.modules.dropout._DropoutNd)

#: methods ending in ``_`` that change no values
_NOT_MUTATING = frozenset({"requires_grad_", "share_memory_", "record_stream"})

#: in-place ops whose name without ``_`` computes something else (comparisons return
#: bool, the random fills read ``self`` as probabilities or not at all): they run on a clone
_NO_TWIN = frozenset({
    "bernoulli_", "normal_", "uniform_", "random_", "exponential_", "geometric_", "cauchy_", "log_normal_",
    "eq_", "ne_", "lt_", "le_", "gt_", "ge_", "greater_", "greater_equal_", "less_", "less_equal_",
    "not_equal_", "logical_not_", "logical_and_", "logical_or_", "logical_xor_",
})

#: in-place ops that rebind storage: no functional form dcopt could check
_UNSUPPORTED = frozenset({"set_", "resize_", "resize_as_"})

_AUGMENTED = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv, operator.imod: operator.mod,
    operator.ipow: operator.pow, operator.iand: operator.and_, operator.ior: operator.or_,
    operator.ixor: operator.xor, operator.ilshift: operator.lshift, operator.irshift: operator.rshift,
    operator.imatmul: operator.matmul,
}

_FUNCTION_NAMESPACES = (F, torch, torch._C._nn)

#: plain Python operators: none returns its operand's memory (getitem is a view function)
_KNOWN_FRESH = frozenset(v for v in vars(operator).values() if callable(v))


def _trailing_underscore(name: str) -> bool:
    return name.endswith("_") and not name.endswith("__") and name not in _NOT_MUTATING


def _is_torch_function(fn: Any) -> bool:
    module = getattr(fn, "__module__", None) or ""
    return module == "torch" or module.startswith("torch.") or isinstance(fn, types.BuiltinFunctionType)


def _inplace_kwarg(fn: Any, args: tuple, kwargs: dict) -> Optional[inspect.BoundArguments]:
    """The bound call when ``fn`` is a torch function called with ``inplace=True``
    (``F.relu(x, inplace=True)``, or ``F.relu(x, True)``)."""
    if not isinstance(fn, types.FunctionType) or not _is_torch_function(fn):
        return None
    try:
        sig = inspect.signature(fn)
        if "inplace" not in sig.parameters:
            return None
        bound = sig.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    if bound.arguments.get("inplace") is not True:
        return None
    if fn in VIEW_FUNCTIONS and bound.arguments.get("training", True) is False:
        return None  # dropout outside training returns its input untouched
    return bound


def _function_twin(fn: Any) -> Optional[Any]:
    """``torch.relu_`` -> ``torch.relu``, ``F.elu_`` -> ``F.elu``; None without a twin."""
    name = getattr(fn, "__name__", "")
    if name in _NO_TWIN:
        return None
    for ns in _FUNCTION_NAMESPACES:
        if getattr(ns, name, None) is fn:
            twin = getattr(ns, name[:-1], None)
            if callable(twin):
                return twin
    for ns in _FUNCTION_NAMESPACES:   # F.relu_ is torch.relu_: any namespace's twin
        twin = getattr(ns, name[:-1], None)
        if callable(twin):
            return twin
    return None


def _module_forward_is_torch(module: nn.Module) -> bool:
    return type(module).forward.__module__.startswith("torch.nn")


class _Mutation:
    """How an in-place node is made functional: ``kind`` is ``"method"``, ``"function"``,
    ``"kwarg"``, ``"clone"`` (run on a copy) or ``"module"`` (rewire only)."""

    def __init__(self, kind: str, twin: Any = None, bound: Optional[inspect.BoundArguments] = None):
        self.kind, self.twin, self.bound = kind, twin, bound


def _mutation(node: torch.fx.Node, modules: dict) -> Optional[_Mutation]:
    """What makes ``node`` functional, or None when it mutates nothing."""
    if not node.args or not isinstance(node.args[0], torch.fx.Node):
        return None
    if node.op == "call_method":
        name = node.target
        if not _trailing_underscore(name):
            return None
        twin = name[:-1]
        if name in _NO_TWIN or not callable(getattr(torch.Tensor, twin, None)):
            return _Mutation("clone")
        return _Mutation("method", twin)
    if node.op == "call_function":
        fn = node.target
        if fn in _AUGMENTED:
            return _Mutation("function", _AUGMENTED[fn])
        bound = _inplace_kwarg(fn, node.args, node.kwargs)
        if bound is not None:
            return _Mutation("kwarg", fn, bound)
        name = getattr(fn, "__name__", "")
        if _trailing_underscore(name) and not name.startswith("_") and _is_torch_function(fn):
            twin = _function_twin(fn)
            return _Mutation("function", twin) if twin is not None else _Mutation("clone")
        return None
    if node.op == "call_module":
        module = modules.get(node.target)
        if getattr(module, "inplace", False) is True and _module_forward_is_torch(module):
            return _Mutation("module")
    return None


def _may_alias_inputs(node: torch.fx.Node, modules: dict) -> list[torch.fx.Node]:
    """The input nodes whose memory ``node``'s result may share (conservative)."""
    inputs = node.all_input_nodes
    first = [node.args[0]] if node.args and isinstance(node.args[0], torch.fx.Node) else []
    if node.op == "call_method":
        if node.target in VIEW_METHODS or _trailing_underscore(node.target):
            return first
        return []
    if node.op == "call_function":
        fn = node.target
        if fn is builtins.getattr:
            return first if len(node.args) > 1 and node.args[1] in _VIEW_ATTRS else []
        if fn in VIEW_FUNCTIONS or fn in _AUGMENTED:
            return first
        if _trailing_underscore(getattr(fn, "__name__", "")):
            return first
        return [] if _is_torch_function(fn) or fn in _KNOWN_FRESH else list(inputs)
    if node.op == "call_module":
        module = modules.get(node.target)
        if module is None:
            return list(inputs)
        if not _module_forward_is_torch(module):
            return list(inputs)   # a user's leaf (or an opaque block) may hand back its input
        if isinstance(module, _VIEW_MODULES) or getattr(module, "inplace", False) is True:
            return first
        return []
    return []



def _describe(node: torch.fx.Node) -> str:
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "call_module":
        return f"module {node.target}"
    return f"{getattr(node.target, '__module__', '') or ''}.{getattr(node.target, '__name__', node.target)}()".lstrip(".")


def _what(node: torch.fx.Node) -> str:
    if node.op == "get_attr":
        return f"parameter/buffer {node.target}"
    if node.op == "placeholder":
        return f"input {node.target}"
    return f"'{node.name}' ({_describe(node)}, {source_location(node.stack_trace) or 'no source line'})"


def _check_exact(node: torch.fx.Node, a: torch.fx.Node, order: dict, modules: dict) -> None:
    """Raise TraceError unless the only tensor that ``node`` (an in-place op on ``a``)
    changes and anyone reads afterwards is ``a`` itself."""
    here = order[node]
    seen = {a}
    todo = [a]
    while todo:
        m = todo.pop()
        if m.op == "get_attr":
            _refuse(node, a, f"it changes {_what(m)} on every call (the model's own state)")
        if m is not a and order.get(m, here) < here:
            late = [u for u in m.users if order.get(u, here) > here]
            if late:
                _refuse(node, a, f"{_what(m)} may share memory with the changed tensor and is read "
                                 f"afterwards by {_what(late[0])}")
        neighbours = list(_may_alias_inputs(m, modules))
        neighbours += [u for u in m.users if u is not node and m in _may_alias_inputs(u, modules)]
        for n in neighbours:
            if n not in seen:
                seen.add(n)
                todo.append(n)


def _refuse(node: torch.fx.Node, a: torch.fx.Node, why: str) -> None:
    op = _describe(node)
    raise TraceError(
        f"in-place {op} on '{a.name}' cannot be made out of place exactly: {why}",
        location=source_location(node.stack_trace),
        suggestion="Write it out of place (h = h.relu() rather than h.relu_(); nn.ReLU() rather than "
                   "nn.ReLU(inplace=True)), or .clone() the tensor before changing it in place")


def functionalize(gm: torch.fx.GraphModule) -> int:
    """Make the in-place ops of ``gm`` out of place (see the module docstring); returns how
    many it rewrote. Raises :class:`~dcopt.TraceError` for one it cannot rewrite exactly.
    The caller recompiles ``gm``."""
    graph = gm.graph
    modules = dict(gm.named_modules())
    nodes = list(graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    done = 0
    for node in nodes:
        how = _mutation(node, modules)
        if how is None:
            continue
        if node.op == "call_method" and node.target in _UNSUPPORTED:
            _refuse(node, node.args[0], "it changes which memory the tensor uses")
        a = node.args[0]
        _check_exact(node, a, order, modules)
        if how.kind in ("method", "function"):
            node.target = how.twin
            node.meta[_TWIN_OF] = a.name   # its dtype may be promoted: see restore_dtypes
        elif how.kind == "kwarg":
            # the tensor positionally, everything else by keyword, inplace=False
            arguments = dict(how.bound.arguments)
            first = next(iter(arguments))
            node.args = (arguments.pop(first),)
            node.kwargs = {**arguments, "inplace": False}
        elif how.kind == "clone":
            with graph.inserting_before(node):
                copy = graph.call_method("clone", (a,))
            copy.stack_trace = node.stack_trace
            order[copy] = order[node] - 0.5
            node.args = (copy, *node.args[1:])
        # every later reader of `a` reads the changed tensor
        for user in list(a.users):
            if user is not node and order.get(user, -1) > order[node]:
                user.replace_input_with(a, node)
        done += 1
    return done


def restore_dtypes(gm: torch.fx.GraphModule) -> int:
    """Cast back an out-of-place twin whose result has another dtype than the tensor its
    in-place op wrote into, after shape propagation (``node.meta["tensor_meta"]``).

    Why: an in-place op keeps its tensor's dtype, its twin follows type promotion
    (float16 ``h.add_(float32)`` stays float16, ``h.add(float32)`` is float32), so the
    traced model would compute and return in another precision than the user's. Returns
    how many casts were inserted; the caller recompiles and propagates shapes again."""
    graph = gm.graph
    by_name = {n.name: n for n in graph.nodes}
    done = 0
    for node in list(graph.nodes):
        a = by_name.get(node.meta.get(_TWIN_OF))
        if a is None:
            continue
        want, got = a.meta.get("tensor_meta"), node.meta.get("tensor_meta")
        if not hasattr(want, "dtype") or not hasattr(got, "dtype") or want.dtype == got.dtype:
            continue
        with graph.inserting_after(node):
            cast = graph.call_method("to", (node, want.dtype))
        cast.stack_trace = node.stack_trace
        node.replace_all_uses_with(cast, delete_user_cb=lambda user: user is not cast)
        done += 1
    return done
