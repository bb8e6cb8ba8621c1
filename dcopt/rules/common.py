"""Building blocks shared by the rule families."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..errors import source_location
from ..fmap import FMap, Positions

__all__ = ["normalizes_features_alone", "normalizes_last", "passthrough", "norm_dim", "norm_dims", "reject_tracked", "n_outputs", "Width",
           "width_of", "widths_in", "reads_widths", "pin_widths", "selects",
           "per_row_weight"]


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


def normalizes_features_alone(ctx, x, fm: Optional[FMap], n_dims: int) -> bool:
    """A norm over the last ``n_dims`` dims whose statistics run over ``x``'s features and
    nothing else (``n_dims == 1``, the features last): the norm dcopt learns with masked
    statistics. Otherwise :func:`normalizes_last` says what becomes of the features."""
    return fm is not None and n_dims == 1 and fm.dim == len(ctx.shape(x)) - 1


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


@dataclass(frozen=True, eq=False)
class Width:
    """A number the forward reads from a tracked dimension (``h.size(1)``, ``h.shape[-1]``,
    ``h.numel()``). It is ``N`` in the gated model and the kept count after export, so
    wherever the forward computes with it the two models differ: only rules that show
    it is recomputed exactly may take it (:func:`reads_widths`); anywhere else the walk
    keeps the groups in ``pos`` fixed. ``exact``: the number is the length of ``pos``
    (a size), not a product with other dims (``numel``)."""
    pos: Positions
    node: str
    where: Optional[str]
    exact: bool = True


def width_of(ctx, fm: Optional[FMap], dim: Optional[int], exact: bool = True) -> Optional[Width]:
    """The :class:`Width` this node reads when it reads dim ``dim`` (None: the whole tensor)
    of a tensor with map ``fm``; None where no group's width is involved (batch, time)."""
    if fm is None or (dim is not None and dim != fm.dim) or fm.pos.is_fixed():
        return None
    return Width(fm.pos, ctx.node.name, source_location(ctx.node.stack_trace), exact and dim is not None)


def widths_in(v: Any) -> list[Width]:
    """Every :class:`Width` in an analysis value (a size tuple holds one per dim)."""
    if isinstance(v, Width):
        return [v]
    if isinstance(v, (tuple, list)):
        return [w for x in v for w in widths_in(x)]
    return []


def reads_widths(rule):
    """Mark a rule that handles the :class:`Width` values among its arguments itself
    (indexing a size tuple, a reshape that recomputes the size). Any other node given one
    keeps those groups fixed."""
    rule.reads_widths = True
    return rule


def selects(rule):
    """Mark a rule that picks one element of a container (``t[0]``, ``t.values``): the
    other elements' features go on to the nodes that pick them, so the walk's check that
    every tracked input is accounted for (``_Walker.account``) looks at its tensor
    arguments only, not inside the container."""
    rule.selects = True
    return rule


def per_row_weight(ctx, fm: Optional[FMap], broadcast: bool, where: str) -> bool:
    """Whether ``fm`` is one feature ``broadcast`` along another tensor's features — an
    attention-pooling weight ``softmax(att(h), dim=1)`` against ``h`` — which scales rows
    rather than meeting ``h``'s channels. It keeps its one feature (the rule then treats
    it as untracked), so ``h``'s group goes on."""
    if fm is None or len(fm.pos) != 1 or not broadcast:
        return False
    ctx.reject(fm, f"one feature broadcast along other features ({where}); it keeps its width", kind="fixed")
    return True


def pin_widths(ctx, widths, what: str) -> None:
    """Keep the groups whose width these numbers are fixed: ``what`` computes with them."""
    for w in widths:
        at = f" at {w.where}" if w.where else ""
        ctx.reject(w.pos, f"the forward reads the width of the features ({w.node}{at}) and {what} uses it as "
                          "a number; removing features would change that number")
