"""Elementwise ops, unary and n-ary with broadcasting.

An elementwise op keeps features apart, so the output carries its inputs' map. When
two tracked inputs meet, their channels are the same channels (a residual add, an SE
multiply): the groups are coupled. A full-width parameter operand (layer scale) is
sliced with the group; a full-width *computed* fixed tensor pins the group.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

from ..fmap import FMap, Positions
from .common import Width, passthrough, per_row_weight, pin_widths, reads_widths, widths_in
from .registry import register_rule

__all__ = ["elementwise"]


def _operands(ctx):
    """Every tensor-valued argument: (arg, shape, fmap, its ParamRef when a parameter or
    buffer or a slice of one, else None)."""
    from ..analysis import ParamRef

    out = []
    flat = []
    torch.fx.node.map_arg((ctx.node.args, ctx.node.kwargs), lambda n: flat.append(n) or n)
    for a in flat:
        shape = ctx.shape(a)
        if shape is None:
            continue
        ref = ctx.value(a)
        out.append((a, shape, ctx.fmap(a), ref if isinstance(ref, ParamRef) else None))
    return out


#: ops that hand on a tensor's very values: a parameter (view) through them is still that
#: parameter, which a later rule may slice (``self.h0.expand(-1, B, -1).contiguous()``)
_SAME_VALUES = {"contiguous", "clone", "detach", torch.clone, torch.detach}


def elementwise(ctx):
    out_shape = ctx.out_shape
    ops = _operands(ctx)
    tracked = [(a, s, fm) for a, s, fm, _ in ops if fm is not None]
    if not tracked:
        if ctx.node.target in _SAME_VALUES and len(ops) == 1 and ops[0][3] is not None:
            return ops[0][3]
        return None
    if out_shape is None:
        ctx.reject([fm for _, _, fm in tracked], "elementwise op with a non-tensor result")
        return None
    nd = len(out_shape)
    # a group one feature wide broadcast along another's features (attention pooling:
    # softmax(att(h), dim=1) * h, att(h) of shape (B, T, 1)) is a per-row scale, not a
    # channel that meets h's: it keeps its one feature, and h's features go on
    for a, s, fm in list(tracked):
        if per_row_weight(ctx, fm, out_shape[fm.dim + nd - len(s)] != 1, "elementwise"):
            tracked.remove((a, s, fm))
            ops = [(x, sh, None if x is a else f, p) for x, sh, f, p in ops]
    if not tracked:
        return None
    dims = {fm.dim + nd - len(s) for _, s, fm in tracked}
    if len(dims) != 1:
        ctx.reject([fm for _, _, fm in tracked], "two tensors whose features run along different dims meet")
        return None
    od = dims.pop()
    maps = [fm.pos for _, _, fm in tracked]
    params = []
    for a, shape, fm, ref in ops:
        if fm is not None:
            continue
        d = od - (nd - len(shape))
        if d < 0 or shape[d] == 1:
            continue  # broadcast along the features: the same value for every feature
        if ref is not None and d not in ref.sliced:
            params.append((ref.target, d, len(shape)))
        else:
            maps.append(Positions.fixed(shape[d]))
    pos = ctx.unify(maps, f" ({ctx.node.name})")
    for target, d, n in params:
        dims_ = tuple(pos if i == d else None for i in range(n))
        ctx.plan_param(target, dims_, absolute=True)
    for _, _, fm in tracked:
        ctx.consumes(fm)
    return FMap(od, pos)


_UNARY_FUNCTIONS = [
    torch.relu, torch.relu_, F.relu, F.relu6, F.gelu, F.silu, F.elu, F.selu, F.celu, F.leaky_relu, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.sigmoid, torch.sigmoid, torch.tanh, F.tanh, F.mish, F.softplus, F.softsign,
    F.logsigmoid, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    torch.exp, torch.log, torch.log1p, torch.log2, torch.log10, torch.abs, torch.sqrt, torch.rsqrt,
    torch.neg, torch.square, torch.sin, torch.cos, torch.erf, torch.reciprocal, torch.sign, torch.floor,
    torch.ceil, torch.round, torch.nan_to_num, torch.zeros_like, torch.ones_like, torch.full_like,
    operator.neg, operator.pos, torch.exp2, torch.expm1, F.threshold, F.hardshrink, F.softshrink,
    F.tanhshrink,
]
_NARY_FUNCTIONS = [
    operator.add, operator.sub, operator.truediv, operator.iadd, operator.isub, operator.imul,
    operator.itruediv, operator.pow, torch.add, torch.sub, torch.mul, torch.div, torch.true_divide,
    torch.maximum, torch.minimum, torch.where, torch.clamp, torch.clip, torch.pow, torch.lerp,
    torch.addcmul, torch.addcdiv, torch.fmax, torch.fmin, torch.rsub, torch.sub, torch.multiply,
    torch.subtract, torch.divide,
]
_UNARY_METHODS = [
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "exp_", "log", "log_", "log1p", "abs",
    "abs_", "sqrt", "rsqrt", "neg", "square", "sin", "cos", "erf", "reciprocal", "sign", "floor", "ceil",
    "round", "float", "double", "half", "bfloat16", "contiguous", "clone", "detach", "nan_to_num",
    "zero_", "exp2", "expm1", "requires_grad_",
]
_NARY_METHODS = [
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow", "pow_", "clamp", "clamp_", "clip",
    "clip_", "maximum", "minimum", "where", "masked_fill", "masked_fill_", "lerp", "addcmul", "addcdiv",
    "rsub", "true_divide", "multiply", "subtract", "divide",
]

register_rule(*_UNARY_FUNCTIONS, *_NARY_FUNCTIONS, *_UNARY_METHODS, *_NARY_METHODS, rule=elementwise)


@register_rule("to", "type", "type_as", "cpu", "cuda")
def cast(ctx):
    """Casts and moves keep every value where it is (``type_as(other)`` reads only a dtype)."""
    for a in ctx.node.all_input_nodes[1:]:
        ctx.reads_only_metadata(a)
    return passthrough(ctx)


@register_rule("new_zeros", "new_ones", "new_full", "new_empty")
def new_factory(ctx):
    """``h.new_zeros(size)`` takes only ``h``'s dtype and device: an untracked tensor of the
    given size (a size read from a tracked width keeps that group fixed, as everywhere)."""
    ctx.reads_only_metadata(ctx.arg(0))
    return None


def _whole_number(ctx, arg) -> bool:
    """A Python int (not a bool) that depends on no width: a literal, or a number the
    forward computed (``x.size(2)`` of a dim without features)."""
    if isinstance(arg, torch.fx.Node):
        return arg.meta.get("type") is int and not widths_in(ctx.value(arg)) and ctx.fmap(arg) is None
    return type(arg) is int


@register_rule(operator.mul)
@reads_widths
def mul(ctx):
    """``a * b``. On tensors, as every elementwise op. A width read from the features times
    a whole number that depends on no width (``c * f`` after ``b, c, f, t = x.shape``) is
    that width scaled (an inexact :class:`Width`): a reshape may take it as the size of
    those features merged with other dims (``x.view(b, c * f, t)``), recomputed after
    export as the kept width times ``f``. Any other use of a width keeps its group fixed."""
    args = list(ctx.node.args[:2])
    values = [ctx.value(a) if isinstance(a, torch.fx.Node) else a for a in args]
    widths = widths_in(values)
    if not widths:
        return elementwise(ctx)
    if len(args) == 2 and not ctx.node.kwargs:
        for w, other in ((values[0], args[1]), (values[1], args[0])):
            if isinstance(w, Width) and _whole_number(ctx, other):
                return Width(w.pos, ctx.node.name, w.where, exact=False)
    pin_widths(ctx, widths, "*")
    return elementwise(ctx)
