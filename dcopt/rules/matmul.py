"""Matrix products: ``a @ b``, ``torch.matmul``, ``torch.bmm``.

For ``a`` of shape (..., n, k) and ``b`` of shape (..., k, m), features on ``a``'s row dim
(n) or ``b``'s column dim (m) come through to the output's unmixed; features on the
contracted dim (k) are summed over, so a gate in front zeroes the removed ones — exact,
as for a Linear — provided the other operand's k entries are the same features (a
tracked tensor: the groups are coupled, q·kᵀ of attention) or a parameter that is sliced
with them (``h @ self.W``). Features on a batch dim, two groups kept at once, vectors,
and a contraction against a computed fixed-width tensor keep their width.
"""
from __future__ import annotations

import operator

import torch

from ..fmap import FMap
from .common import per_row_weight
from .registry import register_rule


@register_rule(torch.matmul, operator.matmul, torch.bmm, "matmul", "bmm", "__matmul__")
def matmul(ctx):
    from ..analysis import ParamRef

    a, b = ctx.arg(0, "input"), ctx.arg(1, "other" if "other" in ctx.node.kwargs else "mat2")
    fa, fb = ctx.fmap(a), ctx.fmap(b)
    tracked = [f for f in (fa, fb) if f is not None]
    if not tracked:
        return None
    sa, sb, so = ctx.shape(a), ctx.shape(b), ctx.out_shape
    if sa is None or sb is None or so is None or len(sa) < 2 or len(sb) < 2:
        ctx.reject(tracked, "matrix product with a vector or a non-tensor operand")
        return None
    na, nb, no = len(sa), len(sb), len(so)
    if (fa is not None and fa.dim < na - 2) or (fb is not None and fb.dim < nb - 2):
        ctx.reject(tracked, "features on a batch dim of a matrix product")
        return None
    # one feature on a kept dim (attention pooling softmax(att(h), 1).transpose(1, 2) @ h) is
    # a per-row weight, as in elementwise: it keeps its width and the other group goes on
    if per_row_weight(ctx, fa, fa is not None and fa.dim == na - 2, "a kept dim of a matrix product"):
        fa = None
    if per_row_weight(ctx, fb, fb is not None and fb.dim == nb - 1, "a kept dim of a matrix product"):
        fb = None
    if fa is None and fb is None:
        return None
    a_k = fa if fa is not None and fa.dim == na - 1 else None   # contracted
    b_k = fb if fb is not None and fb.dim == nb - 2 else None
    a_n = fa if fa is not None and fa.dim == na - 2 else None   # kept: output rows / columns
    b_m = fb if fb is not None and fb.dim == nb - 1 else None
    if a_n is not None and b_m is not None:
        ctx.reject(tracked, "a matrix product of two tensors whose features are both kept (an outer "
                            "product of groups)")
        return None
    extra = []
    if a_k is not None or b_k is not None:
        if a_k is not None and b_k is not None:
            pos = ctx.unify([a_k.pos, b_k.pos], f" ({ctx.node.name}: the contracted features)")
        else:
            mine, other, other_arg = (a_k, sb, b) if a_k is not None else (b_k, sa, a)
            ref = ctx.value(other_arg)
            if not isinstance(ref, ParamRef) or len(other) != 2 or ref.sliced:
                ctx.reject(mine, "summed over against a fixed-width tensor that is not a parameter "
                                 "dcopt could slice with it")
                return None
            owner = ref.target.rpartition(".")[0]
            if owner and ctx.layer_rule(owner) is not None:
                # a layer's weight (h @ self.lin.weight): slicing it here would leave the
                # layer's bias and width attributes behind
                ctx.reject(mine, f"summed over against {ref.target}, a weight of layer {owner}; it keeps its shape")
                return None
            pos = mine.pos
            ctx.plan_param(ref.target, (pos, None) if a_k is not None else (None, pos), absolute=True)
        if pos is None:
            return None
        for arg, f in ((a, a_k), (b, b_k)):
            if f is not None:
                ctx.gate(arg)
        extra.append(pos)
    kept = None
    if a_n is not None:
        kept = FMap(no - 2, a_n.pos)
    elif b_m is not None:
        kept = FMap(no - 1, b_m.pos)
    if kept is not None:
        ctx.consumes(kept)
        extra.append(kept.pos)
    ctx.macs(extra=extra)
    return kept
