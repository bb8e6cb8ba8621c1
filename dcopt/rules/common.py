"""Building blocks shared by the rule families."""
from __future__ import annotations

from typing import Optional

from ..fmap import FMap

__all__ = ["normalizes_last", "passthrough", "norm_dim", "norm_dims", "reject_tracked", "n_outputs"]


def n_outputs(node) -> int:
    """Number of tensors a node returns when it returns a tuple (0 for a single tensor)."""
    meta = node.meta.get("tensor_meta")
    if isinstance(meta, (tuple, list)) and not hasattr(meta, "shape"):
        return len(meta)
    return 0


def norm_dim(d: int, nd: int) -> int:
    return d + nd if d < 0 else d


def norm_dims(dims, nd: int) -> Optional[list[int]]:
    """Normalise a ``dim`` argument (int, sequence or None = every dim)."""
    if dims is None:
        return list(range(nd))
    if isinstance(dims, int):
        dims = [dims]
    return [norm_dim(int(d), nd) for d in dims]


def passthrough(ctx) -> Optional[FMap]:
    """The op acts on each feature on its own and keeps the tensor's layout
    (activations, dropout, dtype casts): its output has its input's map."""
    fm = ctx.fmap(ctx.arg(0, "input"))
    ctx.consumes(fm)
    if fm is not None and ctx.out_shape is not None and ctx.shape(ctx.arg(0, "input")) != ctx.out_shape:
        ctx.reject(fm, f"changes the tensor's shape {ctx.shape(ctx.arg(0, 'input'))} -> {ctx.out_shape} "
                       "in a way dcopt does not follow")
        return None
    return fm


def reject_tracked(ctx, reason: str) -> None:
    for _, fm in ctx.tracked_args():
        ctx.reject(fm, reason)


def normalizes_last(ctx, n_dims: int, what: str):
    """LayerNorm-like ops normalize over the last ``n_dims`` dims: per-position elsewhere,
    but over the feature dim their statistics would see the removed features."""
    x = ctx.arg(0, "input")
    fm = ctx.fmap(x)
    if fm is None:
        return None
    if fm.dim >= len(ctx.shape(x)) - n_dims:
        ctx.reject(fm, f"{what} normalizes over the feature dimension: its mean and variance see every "
                       "feature, so removing one changes the rest")
        return None
    ctx.consumes(fm)
    return fm
