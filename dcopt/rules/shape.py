"""Shape ops: the feature dim moves (permute), merges into blocks (flatten/view),
gets offsets (cat), is sliced (getitem), or is split (chunk/split)."""
from __future__ import annotations

import math
import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..fmap import FMap, Positions
from .common import Width, n_outputs, norm_dim, pin_widths, reads_widths, selects, width_of, widths_in
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


def _into_heads_shapes(fm: FMap, in_shape: tuple, out_shape: tuple) -> bool:
    """Whether the view splits the feature dim, and only it, into two: (…, H·D, …) →
    (…, H, D, …) with H > 1 (attention heads)."""
    d = fm.dim
    if len(out_shape) != len(in_shape) + 1 or tuple(out_shape[:d]) != tuple(in_shape[:d]) \
            or tuple(out_shape[d + 2:]) != tuple(in_shape[d + 1:]):
        return False
    return out_shape[d] > 1 and out_shape[d] * out_shape[d + 1] == in_shape[d]


def _into_heads(ctx, fm: FMap, out_shape: tuple) -> Optional[FMap]:
    """A layer's output viewed as H heads of D features (``q.view(B, T, H, D)``): the
    group is cut into H parts (:meth:`~dcopt.analysis.Ctx.split_features`) and the parts
    are coupled, so every head keeps the same first features; the features then run
    along the D dim, the head dim holding no features. Exact: each head's kept features
    are a prefix of that head, and merging the heads back (``view(B, T, H * D)``) tiles
    the map as any flatten does. The D entry of the target sizes is rewritten at export
    (or ``-1``); the H entry must stay as written."""
    heads, dh = out_shape[fm.dim], out_shape[fm.dim + 1]
    parts = ctx.split_features(fm.pos, [dh] * heads, f"{_name(ctx)} into {heads} heads")
    if parts is None:
        return None
    pos = ctx.unify(parts, f" ({ctx.node.name}: heads keep the same features)")
    return FMap(fm.dim + 1, pos) if pos is not None else None


def _target_entries(ctx, spec: dict) -> Optional[list]:
    """The target sizes as written: an int literal, or for a computed entry the
    :class:`Width` it is (None: a number the analysis cannot name). None where not even
    the list can be read (``x.view(shape)`` with ``shape`` computed elsewhere)."""
    if "kwarg" in spec:
        raw = ctx.node.kwargs[spec["kwarg"]]
    else:
        raw = ctx.node.args[spec["arg"]] if spec["nested"] else ctx.node.args[spec["arg"]:]
        if not spec["nested"] and len(raw) == 1 and isinstance(raw[0], torch.fx.Node):
            raw = raw[0]    # x.view(h.shape): one argument holding the whole shape
    if isinstance(raw, torch.fx.Node):
        raw = ctx.value(raw)
        return list(raw) if isinstance(raw, (tuple, list)) else None
    if not isinstance(raw, (tuple, list)):
        return [raw] if isinstance(raw, int) else None
    return [e if isinstance(e, int) else ctx.value(e) if isinstance(e, torch.fx.Node) else None for e in raw]


def _same_positions(a: Positions, b: Positions) -> bool:
    return len(a) == len(b) and torch.equal(a.gid, b.gid) and torch.equal(a.ch, b.ch)


def _repeats(part: Positions, whole: Positions) -> bool:
    """``whole`` holds each position of ``part`` the same number of times k and nothing
    else: at any sizes it keeps k times what ``part`` keeps, which is what a width read
    from ``part`` times k (a scaled :class:`Width`) computes."""
    if not len(part) or len(whole) % len(part):
        return False
    k = len(whole) // len(part)

    def multiset(p: Positions) -> list:
        return sorted(zip(p.gid.tolist(), p.ch.tolist()))
    return multiset(whole) == sorted(multiset(part) * k)


def _reshape(ctx, literal_sizes: Optional[dict] = None):
    """Follow the features through a reshape. With a target shape in the call, the entry
    that holds the features must be an int literal (export rewrites it), ``-1`` (torch
    infers it), the width of these very positions read from a tensor (``B, C, H, W =
    x.shape; x.view(B, C, H * W)``: it is recomputed after export), or that width times
    a number of other dims, for features merged with them (``x.view(B, C * H, W)``); any
    other computed number (``T * 16`` with ``T = x.size(1)``) stays what it was, so the
    group keeps its width."""
    x = ctx.arg(0, "input")
    fm = ctx.fmap(x)
    widths = widths_in([ctx.value(a) for a in ctx.node.all_input_nodes])
    if fm is None:
        pin_widths(ctx, widths, _name(ctx))
        return None
    out = reshape_fmap(fm, ctx.shape(x), ctx.out_shape)
    if out is None and _into_heads_shapes(fm, ctx.shape(x), ctx.out_shape):
        out = _into_heads(ctx, fm, ctx.out_shape)
        if out is None:   # rejected, with the reason
            pin_widths(ctx, widths, _name(ctx))
            return None
    if out is None:
        ctx.reject(fm, f"reshapes {ctx.shape(x)} -> {ctx.out_shape}, splitting the feature dimension")
        pin_widths(ctx, widths, _name(ctx))
        return None
    if literal_sizes is not None:
        entries = _target_entries(ctx, literal_sizes)
        j = out.dim - literal_sizes.get("offset", 0)
        n = len(ctx.out_shape) - (len(ctx.shape(x)) - 1 if "offset" in literal_sizes else 0)
        entry = entries[j] if entries is not None and len(entries) == n and 0 <= j < n else None
        if entries is not None and len(entries) == n and not 0 <= j < n:
            pass    # unflatten of other dims: no entry holds the features
        else:
            widths = _feature_size_entry(ctx, fm, entry, out, literal_sizes, widths, entries)
            if widths is None:
                return None
    pin_widths(ctx, widths, _name(ctx))
    ctx.consumes(fm)
    return out


def _feature_size_entry(ctx, fm: FMap, entry, out: FMap, spec: dict, widths: list,
                        entries: Optional[list]) -> Optional[list]:
    """The entry of a target size list (reshape, expand) that sizes the features ``out``:
    a literal is rewritten at export (``-1`` left as it is), the width read from these very
    features is recomputed; anything else keeps the groups fixed. Returns the widths still
    to pin, or None when it rejected. A width that also fills another entry
    (``m.expand(b, n, n)``) sizes a dim without features there: it stays pinned."""
    if isinstance(entry, int) and not isinstance(entry, bool):
        ctx.rewrite(dict(kind="shape_literal", out_dim=out.dim, pos=out.pos, **spec))
        return widths
    if isinstance(entry, Width) and sum(e is entry for e in entries or ()) == 1 and \
            (_same_positions(entry.pos, out.pos) if entry.exact else _repeats(entry.pos, out.pos)):
        return [w for w in widths if w is not entry]
    ctx.reject(fm, f"{_name(ctx)} computes the size of the feature dimension (target {ctx.out_shape}); "
                   "only a literal, -1, the width read from these features, or that width times a number "
                   "of other dims (c * f) can be rewritten")
    pin_widths(ctx, widths, _name(ctx))
    return None


def _name(ctx) -> str:
    target = ctx.node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


@register_rule("view", "reshape")
@reads_widths
def view(ctx):
    """``x.view(B, C*H*W)``: a literal width in the call is rewritten at export."""
    return _reshape(ctx, _method_sizes(ctx))


def _method_sizes(ctx) -> dict:
    """Where a Tensor method's target sizes are (``view``, ``reshape``, ``expand``): as
    varargs ``x.view(B, C)``, one tuple ``x.view((B, C))``, or a keyword."""
    args = ctx.node.args[1:]
    for key in ("shape", "size"):
        if key in ctx.node.kwargs:
            return dict(kwarg=key)
    return dict(arg=1, nested=len(args) == 1 and isinstance(args[0], (tuple, list)))


@register_rule(torch.reshape)
@reads_widths
def torch_reshape(ctx):
    spec = dict(arg=1, nested=True) if len(ctx.node.args) > 1 else dict(kwarg="shape")
    return _reshape(ctx, spec)


@register_rule(torch.flatten, "flatten", nn.Flatten, torch.squeeze, "squeeze", torch.unsqueeze, "unsqueeze",
               torch.ravel, "ravel")
def flatten(ctx):
    return _reshape(ctx)


@register_rule("view_as", "reshape_as")
def view_as(ctx):
    """``x.view_as(other)`` takes its target from ``other``."""
    return _sized_like_other(ctx, _reshape(ctx))


def _sized_like_other(ctx, out: Optional[FMap]) -> Optional[FMap]:
    """``x.view_as(other)`` / ``x.expand_as(other)`` read ``other``'s shape, width
    included: exact only where ``other``'s features are these very positions on the same
    dim (both keep the same ones). Otherwise both sides keep their width: ``other``'s is
    a number here, and it sizes a tensor whose features are not its own."""
    other = ctx.fmap(ctx.arg(1, "other"))
    if out is None and other is None:
        return None
    if out is not None and other is not None and other.dim == out.dim and _same_positions(other.pos, out.pos):
        return out
    ctx.reject([m for m in (out, other) if m is not None],
               f"{ctx.node.target} takes its shape from a tensor whose features are not these")
    return None


@register_rule("unflatten", torch.unflatten, nn.Unflatten)
@reads_widths
def unflatten(ctx):
    if ctx.node.op == "call_module":
        spec = dict(offset=norm_dim(ctx.module.dim, len(ctx.shape(ctx.arg(0, "input")))))
        out = _reshape(ctx)
        if out is not None and 0 <= out.dim - spec["offset"] < len(ctx.module.unflattened_size):
            ctx.reject(out, "nn.Unflatten's unflattened_size attribute holds the width of the features, "
                            "which dcopt does not rewrite")
            return None
        return out
    spec = dict(arg=2, nested=True) if len(ctx.node.args) > 2 else dict(kwarg="sizes")
    spec["offset"] = norm_dim(ctx.arg(1, "dim"), len(ctx.shape(ctx.arg(0, "input"))))
    return _reshape(ctx, spec)


@register_rule("repeat", "tile", torch.tile)
def repeat(ctx):
    """repeat/tile may add leading dims and repeat others; the feature dim must be repeated once."""
    fm = ctx.fmap(ctx.arg(0, "input"))
    out = _features_kept_whole(ctx, fm)
    if out is not None:
        ctx.consumes(fm)
    return out


@register_rule(torch.repeat_interleave, "repeat_interleave")
def repeat_interleave(ctx):
    """``k.repeat_interleave(n, dim=1)``: each slice along another dim repeated in place
    (grouped-query attention's key/value heads shared by n query heads). The features keep
    their dim and length; without ``dim`` the tensor is flattened, and along the feature
    dim each feature would be repeated: both keep their width."""
    x = ctx.arg(0, "input")
    fm = ctx.fmap(x)
    if fm is None:
        return None
    dim = ctx.arg(2, "dim")
    if dim is None:
        ctx.reject(fm, "repeat_interleave without dim flattens the tensor")
        return None
    if norm_dim(int(dim), len(ctx.shape(x))) == fm.dim or ctx.out_shape[fm.dim] != len(fm.pos):
        ctx.reject(fm, "repeats along the feature dimension")
        return None
    ctx.consumes(fm)
    return fm


def _features_kept_whole(ctx, fm: Optional[FMap]) -> Optional[FMap]:
    """Where the features land when leading dims are added and other dims grown
    (repeat, tile, expand): the feature dim must keep its length, else rejected."""
    if fm is None:
        return None
    d = fm.dim + len(ctx.out_shape) - len(ctx.shape(ctx.arg(0, "input")))
    if ctx.out_shape[d] != len(fm.pos):
        ctx.reject(fm, "repeats along the feature dimension")
        return None
    return fm.moved(d)


@register_rule("expand", "broadcast_to", torch.broadcast_to)
@reads_widths
def expand(ctx):
    """``g.expand(B, C, T)`` may add leading dims and grow size-1 dims. The features keep
    their dim; its entry in the target sizes must follow the kept width: ``-1`` does, a
    literal is rewritten at export, the width read from these very features is recomputed.
    A literal left as it was would ask a sliced tensor for the old width (an export crash)."""
    fm = ctx.fmap(ctx.arg(0, "input"))
    widths = widths_in([ctx.value(a) for a in ctx.node.all_input_nodes])
    if ctx.node.target == "expand":
        spec = _method_sizes(ctx)
    else:
        spec = dict(arg=1, nested=True) if len(ctx.node.args) > 1 else dict(kwarg="size")
    if fm is None:
        pin_widths(ctx, widths, _name(ctx))
        return _expanded_param(ctx, _target_entries(ctx, spec))
    out = _features_kept_whole(ctx, fm)
    if out is None:
        pin_widths(ctx, widths, _name(ctx))
        return None
    entries = _target_entries(ctx, spec)
    entry = entries[out.dim] if entries is not None and len(entries) == len(ctx.out_shape) else None
    widths = _feature_size_entry(ctx, fm, entry, out, spec, widths, entries)
    if widths is None:
        return None
    pin_widths(ctx, widths, _name(ctx))
    ctx.consumes(fm)
    return out


def _expanded_param(ctx, entries: Optional[list]):
    """A parameter grown along its size-1 dims (a class token ``self.cls.expand(B, -1,
    -1)``, a learned query) is still that parameter along every dim it holds as it is: a
    later op may slice it with a group there, as for the parameter itself. Not followed
    (``sliced``): a dim it grows (one value broadcast to many: slicing the parameter there
    would slice its single entry), and a dim of size > 1 whose entry is not ``-1`` (a
    number export would not rewrite). Only without new leading dims (the view's dims are
    the parameter's)."""
    from ..analysis import ParamRef

    ref = ctx.value(ctx.arg(0, "input"))
    shape = ctx.shape(ctx.arg(0, "input"))
    if not isinstance(ref, ParamRef) or shape is None or ctx.out_shape is None or \
            len(ctx.out_shape) != len(shape) or entries is None or len(entries) != len(shape):
        return None
    fixed = {d for d, (n, m, e) in enumerate(zip(shape, ctx.out_shape, entries)) if n != m or (n > 1 and e != -1)}
    return ParamRef(ref.target, frozenset(ref.sliced | fixed))


@register_rule("expand_as")
def expand_as(ctx):
    return _sized_like_other(ctx, repeat(ctx))


# -- indexing -------------------------------------------------------------------------------

@register_rule(operator.getitem)
@reads_widths
@selects
def getitem(ctx):
    """Containers (RNN outputs, split results, a size tuple) pick an element or a slice of
    them; tensors are indexed. A width used in the index (``y[:, :h.size(1)]``) pins it."""
    src = ctx.arg(0)
    val = ctx.value(src)
    index = ctx.arg(1)
    used = [ctx.value(a) for a in ctx.node.all_input_nodes if a is not src]
    pin_widths(ctx, widths_in(used), "an index")
    if isinstance(val, (tuple, list)):
        if isinstance(index, (int, slice)) and not isinstance(index, bool) and not widths_in(used):
            return val[index] if isinstance(index, int) else type(val)(val[index])
        tracked = [v for v in val if isinstance(v, FMap)] + [w.pos for w in widths_in(val)]
        ctx.reject(tracked, "picks from a tuple of tracked tensors by an index dcopt cannot read")
        return None
    if not isinstance(val, FMap):
        return _param_view(val, index, ctx.shape(src))
    return _index_tensor(ctx, val, ctx.shape(src), index)


def _param_view(val, index, shape: Optional[tuple]):
    """A basic slice of a parameter or buffer (``self.pe[:x.size(1)]``, a positional
    encoding cut to the input's length) is still that tensor, dim for dim: elementwise
    may slice it with a group along a dim the view holds whole. Anything else (int or
    tensor indices, new axes) is an untracked tensor, as before."""
    from ..analysis import ParamRef

    items = index if isinstance(index, tuple) else (index,)
    if not isinstance(val, ParamRef) or shape is None or len(items) > len(shape) \
            or not all(isinstance(i, slice) for i in items):
        return None
    whole = slice(None, None, None)
    sliced = {d for d, i in enumerate(items) if i != whole} | set(val.sliced)
    return ParamRef(val.target, frozenset(sliced))


def _repeats_features(pos: Positions) -> bool:
    """Whether some tracked feature occurs more than once along this dim."""
    tracked = pos.gid >= 0
    if not tracked.any():
        return False
    pairs = pos.gid[tracked] * (int(pos.ch.max()) + 1) + pos.ch[tracked]
    return pairs.unique().numel() < pairs.numel()


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
            elif _repeats_features(fm.pos):
                # (channel × row) blocks, as after permute + flatten: the layout, and so which
                # features literal bounds pick, depends on the other dim's size; export's
                # bounds, rewritten for the example's layout, would pick others at another size
                ctx.reject(fm, "slices a dimension that holds each feature several times (features flattened "
                               "with another dim): which features the bounds pick depends on that dim's size")
                return None
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

def _tensor_list(ctx, tensors) -> tuple[list, list]:
    """Shapes and maps of cat's or stack's tensors: a list of nodes, or one node holding a
    tuple (``torch.cat(parts[1:])`` of a split)."""
    if isinstance(tensors, torch.fx.Node):
        meta = tensors.meta.get("tensor_meta")
        val = ctx.value(tensors)
        if not isinstance(meta, (tuple, list)) or any(not hasattr(m, "shape") for m in meta):
            raise TypeError(f"cannot read the tensors of {tensors.name}")
        fms = list(val) if isinstance(val, (tuple, list)) and len(val) == len(meta) else [None] * len(meta)
        return [tuple(m.shape) for m in meta], [f if isinstance(f, FMap) else None for f in fms]
    return [ctx.shape(t) for t in tensors], [ctx.fmap(t) for t in tensors]


@register_rule(torch.cat, torch.concat, torch.concatenate)
def cat(ctx):
    """cat on the feature dim concatenates the maps (offsets); on another dim the inputs'
    features must be the same features, so they are coupled."""
    tensors = ctx.arg(0, "tensors")
    dim = ctx.arg(1, "dim", 0)
    shapes, fms = _tensor_list(ctx, tensors)
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
    # a parameter joined along another dim (a class token before the frames) holds the
    # same features along fd: it is sliced with them, as elementwise slices a layer scale
    refs = _parameter_operands(ctx, tensors, fms, shapes, fd)
    fixed = [t.name for t, f, r in zip(tensors if isinstance(tensors, (list, tuple)) else (), fms, refs)
             if f is None and r is None and isinstance(t, torch.fx.Node)]
    pos = ctx.unify([f.pos if f is not None else Positions.fixed(s[fd])
                     for f, s, r in zip(fms, shapes, refs) if r is None],
                    f" ({ctx.node.name}" + (f", joined with {', '.join(fixed)}" if fixed else "") + ")")
    if pos is not None:
        for ref, s in zip(refs, shapes):
            if ref is not None:
                ctx.plan_param(ref.target, tuple(pos if i == fd else None for i in range(len(s))), absolute=True)
    for f in fms:
        ctx.consumes(f)
    return FMap(fd, pos)


def _parameter_operands(ctx, tensors, fms, shapes, fd: int) -> list:
    """For each of cat's tensors: its ParamRef when it is an untracked parameter (or a view
    holding it whole along ``fd``) as long as the features, else None."""
    from ..analysis import ParamRef

    nodes = tensors if isinstance(tensors, (list, tuple)) else [None] * len(fms)
    n = len(next(f for f in fms if f is not None).pos)
    out = []
    for t, f, s in zip(nodes, fms, shapes):
        ref = ctx.value(t) if isinstance(t, torch.fx.Node) and f is None else None
        ok = isinstance(ref, ParamRef) and fd not in ref.sliced and fd < len(s) and s[fd] == n
        out.append(ref if ok else None)
    return out


@register_rule(torch.stack)
def stack(ctx):
    tensors = ctx.arg(0, "tensors")
    dim = ctx.arg(1, "dim", 0)
    shapes, fms = _tensor_list(ctx, tensors)
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
    """On another dim every part carries the input's features. On the feature dim each
    part gets its own positions (:meth:`~dcopt.analysis.Ctx.split_features`: a cut inside
    one group makes each part a group of its own), and export cuts the kept features at
    the parts' kept sizes: the call becomes ``x.split([k1, k2, ...], dim)``."""
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
        return _split_features(ctx, fm, target)
    ctx.consumes(fm)
    if target == "unbind":
        out = fm.moved(fm.dim - 1 if dim < fm.dim else fm.dim)
    else:
        out = fm
    return tuple(out for _ in range(n_out))


def _split_features(ctx, fm: FMap, target: str):
    """chunk/split/tensor_split on the feature dim: parts read from the shapes the example
    gave (chunk may return fewer parts than asked), each with its own positions."""
    if target == "unbind":
        ctx.reject(fm, "unbind makes each feature a tensor of its own: removing features would change how many "
                       "tensors it returns")
        return None
    metas = ctx.node.meta.get("tensor_meta")
    if not isinstance(metas, (tuple, list)) or not all(hasattr(m, "shape") for m in metas):
        ctx.reject(fm, f"{target} splits the feature dimension, and its parts' shapes are unknown")
        return None
    sizes = [int(m.shape[fm.dim]) for m in metas]
    parts = ctx.split_features(fm.pos, sizes, target)
    if parts is None:
        return None
    ctx.consumes(fm)
    ctx.rewrite(dict(kind="split", pos=fm.pos, sizes=sizes, dim=fm.dim))
    return tuple(FMap(fm.dim, p) for p in parts)


@register_rule(F.glu, nn.GLU)
def glu(ctx):
    """GLU = chunk(2) on ``dim``, then ``a * sigmoid(b)``: the halves are split like a
    chunk and coupled like an elementwise product, so channel j of one half goes with
    channel j of the other (export keeps rows j and N/2+j of the producer together); the
    halves keep equal sizes, so GLU itself needs no rewrite."""
    x = ctx.arg(0, "input")
    fm = ctx.fmap(x)
    if fm is None:
        return None
    nd = len(ctx.shape(x))
    dim = norm_dim(ctx.module.dim if ctx.module is not None else ctx.arg(1, "dim", -1), nd)
    if dim != fm.dim:
        ctx.reject(fm, f"glu halves dim {dim}, where the features do not run: no rule yet; the features keep "
                       "their width")
        return None
    n = len(fm.pos)
    parts = ctx.split_features(fm.pos, [n // 2, n - n // 2], "glu")
    if parts is None:
        return None
    ctx.consumes(fm)
    return FMap(fm.dim, ctx.unify(parts, f" ({ctx.node.name}: glu multiplies its two halves)"))


# -- reading sizes and attributes ---------------------------------------------------------

def _non_tensor(ctx):
    """dim(), element_size(), get_device(): no tensor, and nothing that depends on a width."""
    return None


register_rule("dim", "element_size", "get_device", rule=_non_tensor)


@register_rule("size")
def size(ctx):
    """``x.size(d)`` is a :class:`Width` where ``d`` is the feature dim (None for batch or
    time); ``x.size()`` a tuple of them, one per dim."""
    x = ctx.arg(0, "input")
    fm, shape = ctx.fmap(x), ctx.shape(x)
    d = ctx.arg(1, "dim")
    if d is None:
        return tuple(width_of(ctx, fm, i) for i in range(len(shape))) if shape is not None else None
    return width_of(ctx, fm, norm_dim(d, len(shape)) if isinstance(d, int) and shape is not None else fm and fm.dim)


@register_rule("numel", "nelement")
def numel(ctx):
    return width_of(ctx, ctx.fmap(ctx.arg(0, "input")), None)


@register_rule(len)
def _len(ctx):
    """``len(x)`` is the size of dim 0."""
    return width_of(ctx, ctx.fmap(ctx.arg(0)), 0)


#: attributes that hold a transposed view of the tensor: where dim ``d`` of ``nd`` goes
_TRANSPOSED = {
    "T": lambda d, nd: nd - 1 - d, "H": lambda d, nd: nd - 1 - d,
    "mT": lambda d, nd: {nd - 1: nd - 2, nd - 2: nd - 1}.get(d, d),
    "mH": lambda d, nd: {nd - 1: nd - 2, nd - 2: nd - 1}.get(d, d),
}
#: attributes that depend on no width (``x.shape`` and ``x.data`` are handled below)
_NO_WIDTH = frozenset({"ndim", "dtype", "device", "layout", "requires_grad", "is_cuda", "is_leaf", "is_sparse",
                       "is_quantized", "is_meta", "is_nested", "itemsize", "names"})
#: fields of the (values, indices) named tuples that max/min/median over a dim return
_FIELDS = {"values": 0, "indices": 1}


@register_rule(getattr)
@selects
def tensor_attr(ctx):
    """``x.shape`` (a tuple with a :class:`Width` at the feature dim), ``x.data`` (the same
    tensor), ``x.T``/``x.mT`` (transposes), ``.values``/``.indices`` of a max over a dim.
    Any other attribute of a tracked tensor is unknown: the group keeps its width, rather
    than the features being lost from view."""
    src, attr = ctx.arg(0), ctx.arg(1)
    val = ctx.value(src)
    if isinstance(val, (tuple, list)) and _values_tracked(val):
        if isinstance(attr, str) and attr in getattr(type(val), "_fields", ()):
            return getattr(val, attr)   # a field of a namedtuple (containers.py)
        if attr in _FIELDS and len(val) == 2:
            return val[_FIELDS[attr]]
        ctx.reject(_values_tracked(val), f"reads .{attr} of a tuple of tracked tensors; no rule for it")
        return None
    if not isinstance(val, FMap) or attr in _NO_WIDTH:
        return None
    shape = ctx.shape(src)
    if attr == "shape":
        return tuple(width_of(ctx, val, i) for i in range(len(shape)))
    if attr == "data":
        ctx.consumes(val)
        return val
    if attr in _TRANSPOSED:
        ctx.consumes(val)
        return val.moved(_TRANSPOSED[attr](val.dim, len(shape)))
    ctx.reject(val, f"reads the attribute .{attr} of a tracked tensor; no rule for it")
    return None


def _values_tracked(val) -> list:
    return [v for v in val if isinstance(v, FMap)]
