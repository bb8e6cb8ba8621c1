"""Shape propagation without the arithmetic of the heavy layers.

The analysis reads only shapes (``node.meta['tensor_meta']``) and MAC counts from the run
on the example inputs, never values. Yet on a conv net nearly all of that run is spent
computing convolutions whose numbers nobody looks at: resnet50's propagation takes 84 ms,
75 of them the forward itself. So, where it is provably safe, a call of an exact
``nn.Conv1d/2d/3d`` or ``nn.Linear`` is run on *meta* tensors (torch's own shape rules and
argument checks, no arithmetic) and its output is replaced by zeros of that shape; every
other op runs for real on what it is given.

Why this cannot change a shape: from the first such layer on, values are zeros instead of
the real activations, so the run is exact as long as no output *shape* depends on a
value. Where a value could reach a shape, the run is not attempted, or is abandoned and
done again with real tensors:

* **before the run** (:func:`shapes_only_safe`): every called module is one of torch's or
  torchvision's own classes (a user's class, or an opaque leaf, may read values in ways nothing can
  observe, e.g. ``x.tolist()`` or ``x.numpy()``), every called function is torch's,
  torchvision's or Python's operator/builtins/math, no method that leaves the dispatcher
  (``tolist``, ``numpy``) is called, and no module or global forward hook is set;
* **during the run** (:class:`ValueGuard`, around every node but those
  :func:`value_blind` knows cannot read a value: convolutions, norms, activations, pools,
  views, arithmetic; its per-op cost tripled the propagation of small nets when it watched
  everything): an op that torch tags as having a data-dependent output
  (``_local_scalar_dense``, i.e. ``item()``, ``bool(t)``, ``int(t)``) or a data-dependent
  output shape (``nonzero``, ``masked_select``,
  ``unique``, indexing with a tensor, ...) aborts the run;
* any exception in the run (zeros can upset an op that real values would not) abandons it
  too; the real run then raises the real error, if there is one.

The real run (``propagate_shapes(count_all=True)`` or the fallback) stays the reference:
the tests check that both give the same shapes, dtypes and MACs on every test model (and
``benchmarks/zoo.py`` on all 80 torchvision classification models). Strides may differ: the
meta kernels do not always choose the memory layout a CPU backend does (a depthwise conv
on a channels-last input), and nothing in dcopt reads strides.
"""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .counting import _CONVS, _hooked

__all__ = ["SHAPE_ONLY_MODULES", "shapes_only_safe", "value_blind", "ValueGuard", "ValueDependent",
           "shape_only_call", "node_shapes"]

#: Module classes whose call, in a shapes-only run, is replaced by its meta-tensor twin
#: (exact classes: a subclass may override ``forward``).
SHAPE_ONLY_MODULES: frozenset = _CONVS | {nn.Linear}

_TRUSTED_CLASS_MODULES = ("torch", "torchvision")
_TRUSTED_FUNCTION_MODULES = ("torch", "torchvision", "_operator", "operator", "builtins", "math")
#: Tensor methods that read values outside the dispatcher, where ValueGuard cannot see them.
_VALUE_READING_METHODS = frozenset({"tolist", "numpy", "__array__", "data_ptr", "storage", "untyped_storage",
                                    "__dlpack__", "__index__", "__int__", "__float__", "__bool__", "item"})

#: torch.nn files whose classes, called on one tensor, have output shapes that depend on
#: input shapes only and never turn a value into a Python number (MultiheadAttention, the
#: one exception in these files, is left out by name).
_VALUE_BLIND_MODULE_FILES = frozenset(f"torch.nn.modules.{name}" for name in (
    "activation", "batchnorm", "conv", "dropout", "flatten", "linear", "normalization", "pooling", "padding",
    "pixelshuffle", "channelshuffle", "upsampling"))
#: Functions and tensor methods of the same kind (``operator.getitem`` only with no tensor in
#: the index: a boolean mask selects a data-dependent number of elements; see
#: _OPERAND_FUNCTIONS for the others).
_VALUE_BLIND_FUNCTIONS = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.neg, operator.matmul,
    operator.eq, operator.getitem, getattr, torch.cat, torch.stack, torch.chunk, torch.split, torch.flatten,
    torch.permute, torch.transpose, torch.swapaxes, torch.reshape, torch.sigmoid, torch.relu, torch.tanh,
    torch.add, torch.mul, torch.einsum, torch.matmul, torch.unsqueeze, torch.squeeze, torch.mean, torch.sum,
    F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.layer_norm, F.softmax, F.dropout,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.avg_pool1d, F.avg_pool2d, torch._C._nn.avg_pool2d,
    F.max_pool1d, F.max_pool2d})
#: Of those, the ones whose tensor arguments are all operands; for the others (views,
#: reductions, pools, splits) a tensor anywhere but in the first argument would be read as
#: a size, so such a call is watched.
_OPERAND_FUNCTIONS = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.matmul, operator.eq,
    torch.cat, torch.stack, torch.add, torch.mul, torch.einsum, torch.matmul, F.layer_norm})
_OPERAND_METHODS = frozenset({"add", "mul", "sub", "div"})
_VALUE_BLIND_METHODS = frozenset({
    "view", "reshape", "flatten", "permute", "transpose", "contiguous", "dim", "size", "expand", "mean", "sum",
    "chunk", "split", "unsqueeze", "squeeze", "softmax", "sigmoid", "relu", "add", "mul", "sub", "div"})
_DATA_DEPENDENT_TAGS = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape)


class ValueDependent(RuntimeError):
    """An op whose output or output shape depends on values ran in a shapes-only run."""


class ValueGuard(TorchDispatchMode):
    """Aborts the run at the first op torch tags as data-dependent (see module docstring).
    The check itself is a tag lookup, but Python dispatch costs tens of microseconds per
    op (watching every node made small nets' propagation slower than the real run), hence
    :func:`value_blind`. An op without tags (not an OpOverload) raises too, and the run
    falls back."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tags = func.tags
        if any(tag in tags for tag in _DATA_DEPENDENT_TAGS):
            raise ValueDependent(f"{func} reads values")
        return func(*args, **(kwargs or {}))


def _trusted_class(module: nn.Module) -> bool:
    return type(module).__module__.split(".", 1)[0] in _TRUSTED_CLASS_MODULES


def _trusted_function(fn: Any) -> bool:
    owner = getattr(fn, "__module__", None)
    return isinstance(owner, str) and owner.split(".", 1)[0] in _TRUSTED_FUNCTION_MODULES


def shapes_only_safe(gm: torch.fx.GraphModule, modules: dict[str, nn.Module]) -> Optional[str]:
    """None when a shapes-only run of ``gm`` is allowed; else why not (for tests and
    debugging; the caller just runs for real)."""
    for name, module in modules.items():
        if _hooked(module):
            return f"module {name or '<root>'} runs a forward hook (its own or a global one)"
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = modules.get(node.target)
            if module is None or not _trusted_class(module):
                return (f"{node.target} is a {type(module).__name__} "
                        "(not one of torch's or torchvision's module classes)")
        elif node.op == "call_function" and not _trusted_function(node.target):
            return f"{node.name} calls {getattr(node.target, '__qualname__', node.target)}, not torch's"
        elif node.op == "call_method" and node.target in _VALUE_READING_METHODS:
            return f"{node.name} calls .{node.target}()"
    return None


def value_blind(node: torch.fx.Node, module: Optional[nn.Module], args: tuple, kwargs: dict) -> bool:
    """True when ``node`` (called with ``args``/``kwargs``; ``module``: the called module of
    a ``call_module`` node) can run without :class:`ValueGuard`: its output shape cannot
    depend on a value and it reads none into Python. False merely means "watch it"."""
    if node.op == "call_module":
        kind = type(module)
        return (kind.__module__ in _VALUE_BLIND_MODULE_FILES and kind is not nn.MultiheadAttention and not kwargs
                and len(args) == 1)
    if node.op == "call_function":
        if node.target in _OPERAND_FUNCTIONS:
            return True
        return node.target in _VALUE_BLIND_FUNCTIONS and not _tensor_in((args[1:], kwargs))
    if node.op == "call_method":
        return node.target in _VALUE_BLIND_METHODS and (node.target in _OPERAND_METHODS
                                                        or not _tensor_in((args[1:], kwargs)))
    return True


def _tensor_in(tree) -> bool:
    return any(isinstance(a, torch.Tensor) for a in torch.utils._pytree.tree_leaves(tree))


def _meta(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else torch.empty_like(t, device="meta")


def shape_only_call(module: nn.Module, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """Zeros shaped like ``module(*args)`` for a :data:`SHAPE_ONLY_MODULES` call with one
    plain tensor argument, computed on meta tensors (so a width mismatch raises torch's
    own error); None: any other call, run it for real."""
    if type(module) not in SHAPE_ONLY_MODULES or kwargs or len(args) != 1 or type(args[0]) is not torch.Tensor:
        return None
    x = args[0]
    weight, bias = _meta(module.weight), _meta(module.bias)
    if type(module) is nn.Linear:
        out = F.linear(_meta(x), weight, bias)
    else:
        out = module._conv_forward(_meta(x), weight, bias)
    return torch.zeros_like(out, device=x.device)   # with the meta kernel's strides (memory format)


def node_shapes(gm: torch.fx.GraphModule) -> dict[str, tuple]:
    """Per node: the shapes and dtypes of its ``tensor_meta`` (nested like its output) and
    its result type, i.e. what the analysis reads of a propagation. Strides are left out
    (see the module docstring). Comparing two runs by this is how the tests and
    benchmarks/zoo.py check the shapes-only run against the real one."""
    def one(meta):
        if hasattr(meta, "shape") and hasattr(meta, "dtype"):
            return tuple(meta.shape), meta.dtype
        return tuple(one(m) for m in meta) if isinstance(meta, (tuple, list)) else meta

    return {n.name: (one(n.meta.get("tensor_meta")), n.meta.get("type")) for n in gm.graph.nodes}
