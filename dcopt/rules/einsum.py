"""``torch.einsum``: read the equation, then treat each index like the dims of a matmul.

An index that carries features is one of:

* kept (in the output): the features come through unmixed. If several operands have it,
  their entries are multiplied one to one (``b``, ``h`` of ``bhid,bhjd->bhij``), so they
  must be the same features: the groups are coupled.
* summed over (not in the output): every operand that has it must carry the same
  features (coupled) and gets a gate in front, which zeroes the removed ones — exact, as
  for a matmul's contracted dim. An index only one operand has is a plain sum.

Kept fixed, with the reason: an operand that has a feature index without features there
(a computed or parameter tensor: it would not be sliced with them), two feature indices
kept at once (an outer product of groups), an index repeated within one operand (a
diagonal), index sizes that broadcast, and an equation that is not a literal string.

MACs: torch runs einsum as permutes, sums and batched matmuls, and which widths the
matmuls see depends on the equation (an index only one operand has is summed out first:
``ij,jk->i`` costs i·j, whatever k), and on the sizes: where the summed indices have one
entry between them, torch multiplies with broadcasting instead, which its counter does
not count (``bhid,bhjd->bhij`` at d = 1 counts 0). So the rule does not assume: it counts
the call on meta tensors at full size and at widths 1, N−1 and N of every feature index
and every combination of them, and accepts only a count that is a product of the widths
it scales with, zero where such a width is 1 (:class:`~dcopt.plan.MacTerm`'s
``vanish_at_one``); anything else keeps the features at their width. At integer sizes
the cost model then gives what torch's counter measures on the exported call.
"""
from __future__ import annotations

import itertools
import math
from typing import Optional

import torch

from ..counting import flop_counter
from ..fmap import FMap
from .registry import register_rule

__all__ = ["einsum"]


def _parse(equation: str, ndims: list[int]) -> Optional[tuple[list[list], list]]:
    """Index tokens per operand and for the output. A letter is its own token; the dims an
    ellipsis stands for are ``("...", j)``, j counted from the right (they broadcast
    right-aligned). None: an equation this parser does not read."""
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ndims):
        return None

    def tokens(term: str, ndim: Optional[int]) -> Optional[list]:
        if term.count("...") > 1 or "." in term.replace("...", ""):
            return None
        head, ell, tail = term.partition("...")
        if not all(c.isalpha() for c in head + tail):
            return None
        n_ell = (ndim - len(head) - len(tail)) if ell else 0
        if ndim is not None and (n_ell < 0 or (not ell and len(head) != ndim)):
            return None
        return list(head) + [("...", j) for j in range(n_ell - 1, -1, -1)] + list(tail)

    ins = [tokens(t, n) for t, n in zip(terms, ndims)]
    if any(t is None for t in ins):
        return None
    n_ell = max([sum(isinstance(x, tuple) for x in t) for t in ins] + [0])
    ell_out = [("...", j) for j in range(n_ell - 1, -1, -1)]
    if arrow:
        if rhs.count("...") > 1 or "." in rhs.replace("...", ""):
            return None
        head, ell, tail = rhs.partition("...")
        if not all(c.isalpha() for c in head + tail):
            return None
        out = list(head) + (ell_out if ell else []) + list(tail)
    else:   # implicit output: the ellipsis, then the letters used once, in alphabetical order
        letters = [c for t in ins for c in t if isinstance(c, str)]
        out = ell_out + sorted(c for c in set(letters) if letters.count(c) == 1)
    return ins, out


def _count(equation: str, shapes: list[tuple]) -> int:
    """MACs torch's counter measures for this einsum on tensors of ``shapes`` (meta: no data)."""
    with flop_counter() as counter:
        torch.einsum(equation, *[torch.empty(s, device="meta") for s in shapes])
    return counter.get_total_flops() // 2


@register_rule(torch.einsum)
def einsum(ctx):
    equation = ctx.arg(0, "equation")
    operands = list(ctx.node.args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    fms = [ctx.fmap(o) for o in operands]
    tracked = [f for f in fms if f is not None]
    if not isinstance(equation, str):   # torch's sublist form: einsum(a, [0, 1], b, [1, 2])
        everything = [f for _, f in ctx.tracked_args()]
        if everything:
            ctx.macs()
            ctx.reject(everything, "einsum's sublist form (operand, [indices], ...) is not read; write the "
                                   "equation string")
        return None
    if not tracked:
        return None
    ctx.macs()   # a constant where the features are kept below; the accepted path says how they scale
    shapes = [ctx.shape(o) for o in operands]
    parsed = _parse(equation, [len(s) for s in shapes]) if all(s is not None for s in shapes) and \
        ctx.out_shape is not None else None
    if parsed is None:
        ctx.reject(tracked, f"an einsum dcopt cannot read ({equation!r})")
        return None
    ins, out = parsed

    feature_tokens: dict = {}     # token -> operand indices whose features sit there
    for i, f in enumerate(fms):
        if f is None:
            continue
        t = ins[i][f.dim]
        if ins[i].count(t) > 1:
            ctx.reject(f, f"einsum {equation!r} takes a diagonal over the feature index")
            return None
        feature_tokens.setdefault(t, []).append(i)

    sizes: dict = {}
    for i, toks in enumerate(ins):
        for t, n in zip(toks, shapes[i]):
            sizes.setdefault(t, set()).add(n)
    kept_token, coupled = None, {}
    for t, holders in feature_tokens.items():
        having = [i for i, toks in enumerate(ins) if t in toks]
        mine = [fms[i] for i in holders]
        if len(sizes[t]) > 1:
            ctx.reject(mine, f"einsum {equation!r} broadcasts the feature index {_show(t)}")
            return None
        if set(having) != set(holders):
            ctx.reject(mine, f"einsum {equation!r}: another operand has the feature index {_show(t)} "
                             "without those features (a fixed-width tensor, not sliced with them)")
            return None
        pos = mine[0].pos if len(mine) == 1 else ctx.unify([f.pos for f in mine], f" ({ctx.node.name}: "
                                                                                  f"einsum index {_show(t)})")
        if pos is None:
            return None
        if t in out:
            if kept_token is not None:
                ctx.reject(tracked, f"einsum {equation!r} keeps two feature indices (an outer product of groups)")
                return None
            kept_token = t
        else:
            for i in holders:
                ctx.gate(operands[i])
        coupled[t] = pos

    found = _mac_widths(ctx, equation, ins, shapes, coupled)
    if found is None:
        return None
    extra, vanish = found
    if extra:
        ctx.macs(extra=extra, vanish_at_one=vanish)
    kept = FMap(out.index(kept_token), coupled[kept_token]) if kept_token is not None else None
    ctx.consumes(kept)
    return kept


def _mac_widths(ctx, equation, ins, shapes, coupled) -> Optional[tuple[list, list[int]]]:
    """The feature indices the call's MACs scale with, each linearly, and those at which a
    width of 1 makes the count 0 (torch multiplies instead of a matmul when the summed
    index has one entry), found by counting: see the module docstring. Every combination
    of 1, N−1 and N per feature index is counted and must fit. None (after rejecting):
    MACs that do not scale so."""
    full = _count(equation, shapes)
    if full == 0:
        return [], []
    tokens = list(coupled)
    width = {t: len(coupled[t]) for t in tokens}

    def count(at: dict) -> int:
        return _count(equation, [tuple(at.get(t, n) for t, n in zip(toks, s)) for toks, s in zip(ins, shapes)])

    linear, vanish = [], []
    for t in tokens:
        n = width[t]
        if n == 1:
            linear.append(t)   # never shrinks: its factor stays 1
            continue
        at_one, below = count({t: 1}), count({t: n - 1})
        if at_one == full and below == full:
            continue           # summed out before any matmul: the MACs do not see it
        linear.append(t)
        if at_one == 0:
            vanish.append(t)
    if len(linear) > 3:
        ctx.reject(list(coupled.values()), f"einsum {equation!r}: more feature indices than dcopt checks")
        return None

    def fits(at: dict, got: int) -> bool:
        """``got == full · Π at/width`` (0 where a vanishing width is 1), in integers: a
        rounded comparison let an affine count (``btd,btd,bt->b``: B·T·d + B·T) pass."""
        if any(at[t] == 1 for t in vanish):
            return got == 0
        return got * math.prod(width[t] for t in linear) == full * math.prod(at[t] for t in linear)

    for combo in itertools.product(*[sorted({1, width[t] - 1, width[t]} - {0}) for t in linear]):
        at = dict(zip(linear, combo))
        if not fits(at, count(at)):
            ctx.reject(list(coupled.values()), f"einsum {equation!r}: its MACs are not a product of the "
                                               f"feature widths (at widths {combo} of {tuple(width[t] for t in linear)})")
            return None
    return [coupled[t] for t in linear], [linear.index(t) for t in vanish]


def _show(token) -> str:
    return "'...'" if isinstance(token, tuple) else repr(token)
