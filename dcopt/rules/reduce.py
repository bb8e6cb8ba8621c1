"""Reductions, softmax-like normalizations and functional pooling.

Over a non-feature dim they keep features apart. Over the feature dim they would see
the removed features (a mean would divide by N, not by the kept count): rejected.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..fmap import FMap
from .common import n_outputs, norm_dim, norm_dims, normalizes_features_alone, normalizes_last
from .elementwise import elementwise
from .registry import register_rule

__all__: list[str] = []


#: reductions that are elementwise when their second argument is a tensor
_BINARY_FORMS = (torch.max, torch.min, "max", "min")

#: where ``dim`` and ``keepdim`` sit among the positional arguments, where not at 1 and 2:
#: norm(input, p, dim, keepdim), vector_norm(x, ord, dim, keepdim), and the legacy
#: std/var(input, dim, unbiased, keepdim) (a bool at 1 is std/var's ``unbiased``: all dims)
_DIM_KEEPDIM = {torch.norm: (2, 3), "norm": (2, 3), torch.linalg.vector_norm: (2, 3),
                torch.std: (1, 3), "std": (1, 3), torch.var: (1, 3), "var": (1, 3)}


def _reduce(ctx):
    if ctx.node.target in _BINARY_FORMS and isinstance(ctx.arg(1, "other"), torch.fx.Node):
        return elementwise(ctx)   # max(a, b) / min(a, b): torch.maximum / minimum, not a reduction
    x = ctx.arg(0, "input")
    fm = ctx.fmap(x)
    if fm is None:
        return None
    shape = ctx.shape(x)
    nd = len(shape)
    i_dim, i_keep = _DIM_KEEPDIM.get(ctx.node.target, (1, 2))
    dims = ctx.arg(i_dim, "dim", None)
    if isinstance(dims, bool) and ctx.node.target in (torch.std, "std", torch.var, "var"):
        dims = None
    keepdim = ctx.arg(i_keep, "keepdim", False)
    reduced = norm_dims(dims, nd) if _readable(dims) else None
    # what these dims give must be the shape the op gave: a misread argument is never trusted
    if (reduced is None or not isinstance(keepdim, bool) or any(not 0 <= d < nd for d in reduced)
            or tuple(1 if i in reduced else s for i, s in enumerate(shape) if keepdim or i not in reduced)
            != _first_out_shape(ctx)):
        ctx.reject(fm, "reduction over a dim dcopt cannot read")
        return None
    if fm.dim in reduced:
        if _zeros_change_nothing(ctx):
            ctx.gate(x)   # the removed features reach it as exact zeros, which it ignores
            return None
        ctx.reject(fm, f"{ctx.node.target if isinstance(ctx.node.target, str) else ctx.node.target.__name__} "
                       "reduces over the feature dimension (it would see the removed features)")
        return None
    ctx.consumes(fm)
    new_dim = fm.dim if keepdim else fm.dim - sum(1 for d in reduced if d < fm.dim)
    out = FMap(new_dim, fm.pos)
    if n_outputs(ctx.node):  # max/min with dim return (values, indices)
        return tuple(out for _ in range(n_outputs(ctx.node)))
    return out


#: reductions a zero entry does not change: a sum, any(), and norms of positive order
_SUMS = (torch.sum, "sum", torch.nansum, "nansum", torch.any, "any")
_NORMS = {torch.norm: ("p", "fro"), "norm": ("p", "fro"), torch.linalg.vector_norm: ("ord", 2)}


def _zeros_change_nothing(ctx) -> bool:
    """Whether this reduction over the features gives the same result when the removed
    features are zeros (the gated model: a gate in front zeroes them) as when they are
    absent (the export): a sum, ``any``, a p-norm with p > 0 or ∞. Not a mean (it divides
    by N), max (a zero can be the max), logsumexp, prod, std, all, or a norm of order ≤ 0
    or -∞ (a zero is the min)."""
    target = ctx.node.target
    if target in _SUMS:
        return True
    if target in _NORMS:
        name, default = _NORMS[target]
        p = ctx.arg(1, name, default)
        return _positive_order(p)
    return False


def _positive_order(p) -> bool:
    if p == "fro":
        return True
    return isinstance(p, (int, float)) and not isinstance(p, bool) and p > 0


def _readable(dims) -> bool:
    """An int, a non-empty sequence of ints, or None (every dim). An empty sequence means
    every dim to some reductions and none to others: not read."""
    if dims is None:
        return True
    if isinstance(dims, (tuple, list)):
        return len(dims) > 0 and all(isinstance(d, int) and not isinstance(d, bool) for d in dims)
    return isinstance(dims, int) and not isinstance(dims, bool)


def _first_out_shape(ctx):
    """The output's shape; of the first output for (values, indices)."""
    meta = ctx.node.meta.get("tensor_meta")
    if isinstance(meta, (tuple, list)) and not hasattr(meta, "shape") and meta:
        meta = meta[0]
    return tuple(meta.shape) if hasattr(meta, "shape") else None


register_rule(torch.mean, torch.sum, torch.amax, torch.amin, torch.max, torch.min, torch.std, torch.var,
              torch.prod, torch.logsumexp, torch.norm, torch.any, torch.all, torch.nansum, torch.nanmean,
              torch.median, torch.linalg.vector_norm,
              "mean", "sum", "amax", "amin", "max", "min", "std", "var", "prod", "logsumexp", "norm", "any",
              "all", "nansum", "nanmean", "median", rule=_reduce)


#: where ``dim`` sits, and its default, where not at 1 without one: normalize(input, p, dim=1)
_ALONG_DIM = {F.normalize: (2, 1)}


def _along_dim(ctx):
    """softmax(x, dim): per-position unless ``dim`` is the feature dim."""
    x = ctx.arg(0, "input")
    fm = ctx.fmap(x)
    if fm is None:
        return None
    nd = len(ctx.shape(x))
    i_dim, default = _ALONG_DIM.get(ctx.node.target, (1, None))
    dim = ctx.arg(i_dim, "dim", default)
    if (ctx.node.target is F.normalize and isinstance(dim, int) and not isinstance(dim, bool)
            and norm_dim(dim, nd) == fm.dim and _positive_order(ctx.arg(1, "p", 2.0))):
        ctx.gate(x)   # x / ‖x‖ₚ: removed features are zeros in the norm and in the output
        return fm
    if not isinstance(dim, int) or isinstance(dim, bool) or norm_dim(dim, nd) == fm.dim:
        name = ctx.node.target if isinstance(ctx.node.target, str) else ctx.node.target.__name__
        ctx.reject(fm, f"{name} works along the feature dimension (it would see the removed features)")
        return None
    ctx.consumes(fm)
    return fm


register_rule(F.softmax, F.log_softmax, F.softmin, torch.softmax, torch.log_softmax, torch.cumsum,
              torch.cumprod, F.normalize, "softmax", "log_softmax", "cumsum", "cumprod", rule=_along_dim)


def _spatial(k_from_fn):
    def rule(ctx):
        x = ctx.arg(0, "input")
        fm = ctx.fmap(x)
        if fm is None:
            return None
        nd = len(ctx.shape(x))
        k = k_from_fn(ctx, nd)
        if fm.dim >= nd - k:
            ctx.reject(fm, f"{ctx.node.target.__name__} works over dim {fm.dim}, where the features run")
            return None
        if n_outputs(ctx.node):
            ctx.reject(fm, "pooling with indices: no rule yet")
            return None
        ctx.consumes(fm)
        return fm
    return rule


for _k, _fns in {1: (F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d, F.lp_pool1d),
                 2: (F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.lp_pool2d),
                 3: (F.max_pool3d, F.avg_pool3d, F.adaptive_avg_pool3d, F.adaptive_max_pool3d)}.items():
    register_rule(*_fns, rule=_spatial(lambda ctx, nd, k=_k: k))

register_rule(F.interpolate, F.upsample, rule=_spatial(lambda ctx, nd: nd - 2))


@register_rule(F.pad)
def _pad(ctx):
    pad = ctx.arg(1, "pad", ())
    return _spatial(lambda c, nd: len(pad) // 2)(ctx)


@register_rule(F.layer_norm, F.rms_norm)
def _layer_norm(ctx):
    """``F.layer_norm(x, (C,), w, b)`` over the features alone (what a LayerNorm subclass
    with its own forward, ESPnet's or torchvision's LayerNorm2d, calls): learned as the
    module is (statistics over the kept features in the gated graph,
    :class:`~dcopt.gates.FunctionalNorm`); the weight and bias, parameters read whole,
    are sliced, and export writes the kept count into ``normalized_shape``. A weight
    computed in the forward, a shape read from the tensor, features inside a multi-dim
    shape keep their width."""
    from ..analysis import ParamRef

    x = ctx.arg(0, "input")
    fm = ctx.fmap(x)
    shape = ctx.arg(1, "normalized_shape")
    n_dims = len(shape) if isinstance(shape, (tuple, list)) else 1
    name = "rms_norm" if ctx.node.target is F.rms_norm else "layer_norm"
    if not normalizes_features_alone(ctx, x, fm, n_dims):
        return normalizes_last(ctx, n_dims, name)
    if not (isinstance(shape, (tuple, list)) and isinstance(shape[0], int)):
        ctx.reject(fm, f"{name}'s normalized_shape is computed in the forward, not a number export can rewrite")
        return None
    params = [ctx.arg(2, "weight")] + ([ctx.arg(3, "bias")] if name == "layer_norm" else [])
    refs = [ctx.value(p) for p in params if p is not None]
    if any(not isinstance(r, ParamRef) or 0 in r.sliced for r in refs):
        ctx.reject(fm, f"{name} with a weight or bias that is not a parameter read whole (computed, cast or "
                       "sliced in the forward): dcopt cannot slice it with the features")
        return None
    ctx.gate(x)
    for ref in refs:
        ctx.plan_param(ref.target, (fm.pos,), absolute=True)
    ctx.masked_function_norm(fm.pos)
    ctx.consumes(fm)
    return FMap(fm.dim, fm.pos)
