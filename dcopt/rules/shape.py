"""Shape ops: the feature dim moves (permute), merges into blocks (flatten/view),
gets offsets (cat), is sliced (getitem), or is split (chunk/split)."""
from __future__ import annotations

import math
import operator
from typing import Optional

import torch
from torch import nn

from ..fmap import FMap, Positions
from .common import n_outputs, norm_dim
from .registry import register_rule

__all__ = ["reshape_fmap"]


# -- permutations ---------------------------------------------------------------------------

def _perm_args(ctx):
    dims = ctx.node.args[1:] if ctx.node.op == "call_method" else (ctx.arg(1, "dims"),)
    if "dims" in ctx.node.kwargs:
        dims = (ctx.node.kwargs["dims"],)
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    return dims


@register_rule(torch.permute, "permute")
def permute(ctx):
    fm = ctx.fmap(ctx.arg(0, "input"))
    if fm is None:
        return None
    nd = len(ctx.shape(ctx.arg(0, "input")))
    dims = [norm_dim(d, nd) for d in _perm_args(ctx)]
    ctx.consumes(fm)
    return fm.moved(dims.index(fm.dim))


@register_rule(torch.transpose, torch.swapaxes, torch.swapdims, "transpose", "swapaxes", "swapdims",
               "transpose_")
def transpose(ctx):
    fm = ctx.fmap(ctx.arg(0, "input"))
    if fm is None:
        return None
    nd = len(ctx.shape(ctx.arg(0, "input")))
    a, b = norm_dim(ctx.arg(1, "dim0"), nd), norm_dim(ctx.arg(2, "dim1"), nd)
    ctx.consumes(fm)
    d = b if fm.dim == a else a if fm.dim == b else fm.dim
    return fm.moved(d)


@register_rule("t")
def t(ctx):
    fm = ctx.fmap(ctx.arg(0, "input"))
    if fm is None:
        return None
    nd = len(ctx.shape(ctx.arg(0, "input")))
    return fm.moved(fm.dim if nd < 2 else 1 - fm.dim)


@register_rule(torch.movedim, torch.moveaxis, "movedim", "moveaxis")
def movedim(ctx):
    fm = ctx.fmap(ctx.arg(0, "input"))
    if fm is None:
        return None
    nd = len(ctx.shape(ctx.arg(0, "input")))
    src, dst = ctx.arg(1, "source"), ctx.arg(2, "destination")
    src = [src] if isinstance(src, int) else list(src)
    dst = [dst] if isinstance(dst, int) else list(dst)
    src = [norm_dim(d, nd) for d in src]
    dst = [norm_dim(d, nd) for d in dst]
    order = [None] * nd
    for s, d in zip(src, dst):
        order[d] = s
    rest = iter(d for d in range(nd) if d not in src)
    order = [o if o is not None else next(rest) for o in order]
    return fm.moved(order.index(fm.dim))


# -- reshapes -------------------------------------------------------------------------------

def reshape_fmap(fm: FMap, in_shape: tuple, out_shape: tuple) -> Optional[FMap]:
    """Where the feature dim lands when ``in_shape`` is viewed as ``out_shape``.

    The features survive a reshape exactly when one output dim holds them whole, as
    ``outer`` repeats of the map with each entry a block of ``inner`` elements (flatten
    after a conv: each channel becomes a block of H*W). A view that splits the feature
    dim itself (channel shuffle) returns None.
    """
    before = math.prod(in_shape[:fm.dim])
    after = math.prod(in_shape[fm.dim + 1:])
    n = in_shape[fm.dim]
    for j in range(len(out_shape)):
        q = math.prod(out_shape[:j])
        r = math.prod(out_shape[j + 1:])
        if q == 0 or r == 0 or before % q or after % r:
            continue
        outer, inner = before // q, after // r
        if out_shape[j] == outer * n * inner:
            return FMap(j, fm.pos.tile(outer, inner))
    return None


def _reshape(ctx, literal_sizes: Optional[tuple] = None):
    x = ctx.arg(0, "input")
    fm = ctx.fmap(x)
    if fm is None:
        return None
    out = reshape_fmap(fm, ctx.shape(x), ctx.out_shape)
    if out is None:
        ctx.reject(fm, f"reshapes {ctx.shape(x)} -> {ctx.out_shape}, splitting the feature dimension")
        return None
    ctx.consumes(fm)
    if literal_sizes is not None:
        ctx.rewrite(dict(kind="shape_literal", out_dim=out.dim, pos=out.pos, **literal_sizes))
    return out


@register_rule("view", "reshape")
def view(ctx):
    """``x.view(B, C*H*W)``: a literal width in the call is rewritten at export."""
    args = ctx.node.args[1:]
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        spec = dict(arg=1, nested=True)
    else:
        spec = dict(arg=1, nested=False)
    if "shape" in ctx.node.kwargs or "size" in ctx.node.kwargs:
        spec = dict(kwarg="shape" if "shape" in ctx.node.kwargs else "size")
    return _reshape(ctx, spec)


@register_rule(torch.reshape)
def torch_reshape(ctx):
    spec = dict(arg=1, nested=True) if len(ctx.node.args) > 1 else dict(kwarg="shape")
    return _reshape(ctx, spec)


@register_rule(torch.flatten, "flatten", nn.Flatten, torch.squeeze, "squeeze", torch.unsqueeze, "unsqueeze",
               torch.ravel, "ravel", "view_as", "reshape_as")
def flatten(ctx):
    return _reshape(ctx)


@register_rule("unflatten", torch.unflatten, nn.Unflatten)
def unflatten(ctx):
    if ctx.node.op == "call_module":
        return _reshape(ctx)
    spec = dict(arg=2, nested=True) if len(ctx.node.args) > 2 else dict(kwarg="sizes")
    spec["offset"] = norm_dim(ctx.arg(1, "dim"), len(ctx.shape(ctx.arg(0, "input"))))
    return _reshape(ctx, spec)


@register_rule("expand", "expand_as", "broadcast_to", torch.broadcast_to, "repeat", "tile", torch.tile)
def expand(ctx):
    """expand/repeat may add leading dims and grow size-1 dims; the feature dim must keep its length."""
    x = ctx.arg(0, "input")
    fm = ctx.fmap(x)
    if fm is None:
        return None
    d = fm.dim + len(ctx.out_shape) - len(ctx.shape(x))
    if ctx.out_shape[d] != len(fm.pos):
        ctx.reject(fm, "repeats along the feature dimension")
        return None
    ctx.consumes(fm)
    return fm.moved(d)


# -- indexing -------------------------------------------------------------------------------

@register_rule(operator.getitem)
def getitem(ctx):
    """Containers (RNN outputs, split results) pick an element; tensors are indexed."""
    src = ctx.arg(0)
    val = ctx.value(src)
    index = ctx.arg(1)
    if isinstance(val, (tuple, list)):
        return val[index] if isinstance(index, int) else None
    if not isinstance(val, FMap):
        return None
    return _index_tensor(ctx, val, ctx.shape(src), index)


def _index_tensor(ctx, fm: FMap, shape: tuple, index):
    items = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, (torch.fx.Node, list, torch.Tensor)) or (i is not None and not isinstance(
            i, (int, slice, type(Ellipsis)))) for i in items):
        ctx.reject(fm, "advanced (tensor or list) indexing of a tracked tensor")
        return None
    consuming = sum(1 for i in items if i is not None and i is not Ellipsis)
    expanded = []
    for i in items:
        if i is Ellipsis:
            expanded += [slice(None)] * (len(shape) - consuming)
        else:
            expanded.append(i)
    expanded += [slice(None)] * (len(shape) - sum(1 for i in expanded if i is not None))
    in_d = out_d = 0
    out_fm = None
    for pos_in_tuple, i in enumerate(expanded):
        if i is None:
            out_d += 1
            continue
        if in_d == fm.dim:
            if isinstance(i, int):
                ctx.reject(fm, "selects a single feature by index")
                return None
            sel = torch.arange(shape[in_d])[i]
            if sel.numel() == shape[in_d] and torch.equal(sel, torch.arange(shape[in_d])):
                out_fm = fm.moved(out_d)
            else:
                picked = fm.pos[sel]
                if not ((picked.gid < 0) | (picked.ch == 0)).any():
                    # each group keeps at least its channel 0; without it (or a fixed
                    # position) this slice could keep no feature at all
                    ctx.reject(fm, "slices the feature dimension so that a small size would keep no feature")
                    return None
                out_fm = FMap(out_d, picked)
                if not isinstance(index, tuple) and len(expanded) == 1:
                    item = None
                else:
                    item = pos_in_tuple
                ctx.rewrite(dict(kind="slice", item=item, in_pos=fm.pos, sel=sel, n_items=len(expanded)))
        if isinstance(i, int):
            in_d += 1
            continue
        in_d += 1
        out_d += 1
    ctx.consumes(fm)
    return out_fm


# -- joins and splits -----------------------------------------------------------------------

@register_rule(torch.cat, torch.concat, torch.concatenate)
def cat(ctx):
    """cat on the feature dim concatenates the maps (offsets); on another dim the inputs'
    features must be the same features, so they are coupled."""
    tensors = ctx.arg(0, "tensors")
    dim = ctx.arg(1, "dim", 0)
    shapes = [ctx.shape(t) for t in tensors]
    fms = [ctx.fmap(t) for t in tensors]
    if all(f is None for f in fms):
        return None
    nd = len(shapes[0])
    dim = norm_dim(dim, nd)
    tracked_dims = {f.dim for f in fms if f is not None}
    if tracked_dims == {dim}:
        for f in fms:
            ctx.consumes(f)
        return FMap(dim, Positions.cat([f.pos if f is not None else Positions.fixed(s[dim])
                                        for f, s in zip(fms, shapes)]))
    if len(tracked_dims) > 1 or dim in tracked_dims:
        ctx.reject([f for f in fms if f is not None], "concatenates tensors whose features run along different dims")
        return None
    fd = tracked_dims.pop()
    pos = ctx.unify([f.pos if f is not None else Positions.fixed(s[fd]) for f, s in zip(fms, shapes)],
                    f" ({ctx.node.name})")
    for f in fms:
        ctx.consumes(f)
    return FMap(fd, pos)


@register_rule(torch.stack)
def stack(ctx):
    tensors = ctx.arg(0, "tensors")
    dim = ctx.arg(1, "dim", 0)
    shapes = [ctx.shape(t) for t in tensors]
    fms = [ctx.fmap(t) for t in tensors]
    if all(f is None for f in fms):
        return None
    dims = {f.dim for f in fms if f is not None}
    if len(dims) > 1:
        ctx.reject([f for f in fms if f is not None], "stacks tensors whose features run along different dims")
        return None
    fd = dims.pop()
    pos = ctx.unify([f.pos if f is not None else Positions.fixed(s[fd]) for f, s in zip(fms, shapes)])
    dim = norm_dim(dim, len(shapes[0]) + 1)
    for f in fms:
        ctx.consumes(f)
    return FMap(fd + 1 if dim <= fd else fd, pos)


@register_rule(torch.split, torch.chunk, torch.unbind, torch.tensor_split, "split", "chunk", "unbind",
               "tensor_split", "split_with_sizes")
def split(ctx):
    x = ctx.arg(0, "input")
    fm = ctx.fmap(x)
    n_out = n_outputs(ctx.node)
    if fm is None:
        return None
    nd = len(ctx.shape(x))
    target = ctx.node.target if isinstance(ctx.node.target, str) else ctx.node.target.__name__
    default = 0
    dim = ctx.arg(1 if target == "unbind" else 2, "dim", default)
    dim = norm_dim(dim, nd)
    if dim == fm.dim:
        ctx.reject(fm, f"{target} splits the feature dimension; no exact rule yet")
        return None
    ctx.consumes(fm)
    if target == "unbind":
        out = fm.moved(fm.dim - 1 if dim < fm.dim else fm.dim)
    else:
        out = fm
    return tuple(out for _ in range(n_out))


def _non_tensor(ctx):
    """size(), dim(), numel(), shape: no tensor, no features."""
    return None


register_rule("size", "dim", "numel", "nelement", "element_size", "get_device", getattr, len, rule=_non_tensor)
