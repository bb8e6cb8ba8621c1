"""``F.scaled_dot_product_attention(q, k, v)``: softmax(q·kᵀ · scale + mask) · v.

Why a rule of its own and not two matmuls: the op is one fx node, and its MACs are a
*sum* over two widths — q·kᵀ contracts q's and k's features (E), attention·v keeps v's
(Ev): ``c · (E + Ev)`` with ``c = batch · heads · L · S``. The cost model multiplies
widths, so the sum is written as the kept count of one map that lists q's positions and
then v's (its kept count is E' + Ev'); at integer sizes this is what torch's counter
measures on the exported op.

The features:

* q's and k's last dims are summed over in q·kᵀ: they must be the same features (the
  groups are coupled), and a gate in front of each zeroes the removed ones — exact, as
  for a matmul. One of the two with features and the other a computed fixed-width tensor
  keeps its width.
* v's last dim comes through to the output unmixed (each output feature is a weighted
  sum of that feature over the keys), so its group goes on.
* Features anywhere else (batch, heads, L, S) and features in the mask keep their width.

The scale: left to torch it is ``1/sqrt(E)``, read from q's width at run time. The gated
model runs at full width, so the export writes that number (``scale=1/sqrt(E)``) into
the call: without it the exported attention would sharpen as q shrinks. A scale the user
passes is kept; one computed from a width (``q.size(-1) ** -0.5``) keeps q and k, as
every number read from a width does.
"""
from __future__ import annotations

import math

import torch.nn.functional as F

from ..fmap import FMap, Positions
from .registry import register_rule

@register_rule(F.scaled_dot_product_attention)
def scaled_dot_product_attention(ctx):
    q, k, v = ctx.arg(0, "query"), ctx.arg(1, "key"), ctx.arg(2, "value")
    mask = ctx.arg(3, "attn_mask")
    fq, fk, fv, fm = ctx.fmap(q), ctx.fmap(k), ctx.fmap(v), ctx.fmap(mask)
    if fm is not None:
        ctx.reject(fm, "features reach the attention mask, whose entries are not sliced with them")
    sq, sk, sv, so = ctx.shape(q), ctx.shape(k), ctx.shape(v), ctx.out_shape
    if any(s is None or len(s) < 2 for s in (sq, sk, sv, so)):
        ctx.reject([f for f in (fq, fk, fv) if f is not None], "attention on operands of unknown shape")
        return None

    def on_last(f, shape, what):
        if f is not None and f.dim != len(shape) - 1:
            ctx.reject(f, f"features on {what}'s dim {f.dim} of attention (a batch, head or sequence dim): "
                          "attention mixes along it")
            return None
        return f

    fq, fk, fv = on_last(fq, sq, "the query"), on_last(fk, sk, "the key"), on_last(fv, sv, "the value")
    qk = None
    if (fq is None) != (fk is None):
        ctx.reject(fq if fq is not None else fk,
                   "summed over in q·kᵀ against a fixed-width tensor (the other of query and key has no "
                   "features dcopt tracks)")
    elif fq is not None:
        qk = ctx.unify([fq.pos, fk.pos], f" ({ctx.node.name}: query and key features)")
        if qk is not None:
            ctx.gate(q)
            ctx.gate(k)
            if ctx.node.kwargs.get("scale") is None and not qk.is_fixed():   # keyword-only
                ctx.rewrite({"kind": "set_kwarg", "name": "scale", "pos": qk,
                             "value": 1.0 / math.sqrt(sq[-1])})
    kept = FMap(len(so) - 1, fv.pos) if fv is not None else None
    ctx.consumes(kept)
    width = Positions.cat([qk if qk is not None else Positions.fixed(sq[-1]),
                           fv.pos if fv is not None else Positions.fixed(sv[-1])])
    if any(f is not None for f in (ctx.fmap(q), ctx.fmap(k), ctx.fmap(v))):
        ctx.macs(extra=[width])   # also when every operand was kept fixed: a constant, said here
    return kept


__all__ = ["scaled_dot_product_attention"]
