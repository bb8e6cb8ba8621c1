"""Put each group's most important features first, before the sizes start to shrink.

dcopt keeps the *first* ⌈s⌉ features of a group (DESIGN.md, consolidation). After the
fixed phase the order of a group's features is whatever the initialisation gave; nothing
in it says that feature 40 of 64 matters less than feature 3. So when the optimize phase
starts shrinking a size, its first cuts fall on features chosen by index. Magnitude
pruning cuts the smallest features first. Reordering each group by magnitude once, at full
width, gives dcopt the same start and changes nothing else: a permutation of a group's
features, applied to every tensor the group touches, is the same function (checked here
by numbers on the example inputs). Measured on the spoken-keywords benchmark it did not
help (README, "Speech": worse at 5 of 6 paired runs), so ``fit`` leaves it off by default.

The tensors to permute and along which dims are the ones :func:`dcopt.export` slices
(``Plan.params``): the slice keeps positions ``ch < k`` of each group, the permutation
moves old feature ``perm[j]`` to position ``j``. Where a group's positions along a dim do
not hold each of its features equally often (only a slice of the group reaches a tensor)
or a feature-dim slice in the graph reads positions by index, the group is left in its
order, with the reason in :class:`Reordered`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
from torch import nn

from .errors import DcoptError
from .export import _float64_dm, _reference_output
from .numcheck import agreement
from .fmap import Positions
from .gates import GatedRNN
from .rewrite import _lookup, as_dynamic_model
from .rnn_noise import SigmaCache

__all__ = ["Reordered", "ReorderError", "magnitude_importance", "reorder_by_importance"]


class ReorderError(DcoptError):
    """Reordering would have changed the model's outputs (a dcopt bug: please report)."""


@dataclass
class Reordered:
    """What :func:`reorder_by_importance` did: ``perms[group]`` lists, for each new
    position, the old index of the feature now there; ``skipped[group]`` says why a group
    kept its order; ``max_error`` is the check's float32 relative error (None: not checked;
    above ``tol`` only when a float64 recheck showed the difference to be rounding, see
    :mod:`dcopt.numcheck`)."""
    perms: dict[str, list[int]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    max_error: Optional[float] = None


def _layout(pos: Positions, g: int, width: int) -> Optional[torch.Tensor]:
    """``table[c, r]``: the index along this dim of the r-th occurrence of group ``g``'s
    feature ``c``, or None when the features do not occur equally often (a partial view
    of the group: a permutation of it has no meaning here)."""
    sel = torch.nonzero(pos.gid == g, as_tuple=False).flatten()
    if sel.numel() == 0:
        return torch.empty(width, 0, dtype=torch.long)
    ch = pos.ch[sel]
    counts = torch.bincount(ch, minlength=width)
    if counts.numel() != width or not bool((counts == counts[0]).all()) or int(counts[0]) == 0:
        return None
    order = torch.argsort(ch, stable=True)
    return sel[order].view(width, int(counts[0]))


def _slice_groups(plan) -> set[int]:
    """Groups a feature-dim slice in the graph reads by index (``x[:, :16]``): their order is
    part of what the graph computes."""
    out: set[int] = set()
    for spec in plan.rewrites.values():
        if spec.get("kind") == "slice":
            pos = spec.get("in_pos")
            if pos is not None:
                out.update(int(g) for g in pos.gid.unique().tolist() if g >= 0)
    return out


def magnitude_importance(model) -> dict[str, torch.Tensor]:
    """Per group, the importance of each feature: over every trainable parameter the group
    reaches (producer rows, per-feature parameters such as BatchNorm's γ, consumer
    columns, an RNN's gate blocks), the squared L2 norm of the feature's slice, divided by
    that parameter's mean over the features (so a large consumer does not drown a
    BatchNorm's γ), summed. Buffers (running statistics) do not count."""
    dm = as_dynamic_model(model, "reorder_by_importance")
    plan = dm.plan
    scores = [torch.zeros(g.width, dtype=torch.float64) for g in plan.groups]
    param_ids = {id(p) for p in dm.gm.parameters()}
    for qual, dims in plan.params.items():
        t = _lookup(dm.gm, qual)
        if id(t) not in param_ids or not t.is_floating_point():
            continue
        sq = t.detach().double().pow(2)
        for d, pos in enumerate(dims):
            if pos is None:
                continue
            per_index = sq.sum(dim=[i for i in range(sq.dim()) if i != d]) if sq.dim() > 1 else sq
            for g in pos.gid.unique().tolist():
                if g < 0:
                    continue
                mask = pos.gid == g
                per_feature = torch.zeros(plan.groups[g].width, dtype=torch.float64)
                per_feature.index_add_(0, pos.ch[mask], per_index[mask.to(per_index.device)].cpu())
                mean = float(per_feature.mean())
                if mean > 0:
                    scores[g] += per_feature / mean
    return {g.name: s for g, s in zip(plan.groups, scores)}


def _full_width(dm) -> list[bool]:
    return [float(kap.detach()) >= 1.0 for kap in dm._kappas()]


@torch.no_grad()
def reorder_by_importance(model, *, importance: Optional[dict] = None, groups: Optional[Iterable[str]] = None,
                          optimizer: Optional[torch.optim.Optimizer] = None, verify: bool = True,
                          tol: float = 1e-5) -> Reordered:
    """Permute every group's features so the most important come first (descending
    ``importance``, default :func:`magnitude_importance`), in place on the DynamicModel.

    * Only groups at full width (κ = 1) are reordered: at full width every feature is kept
      and the function cannot change; a group already shrunk would keep other features.
      Call it between the fixed and the optimize phase (``fit(..., reorder=True)`` does).
    * ``groups``: names of the groups to reorder (default all). Leave out groups whose
      order was given a meaning on purpose, such as a filter bank initialised in
      :func:`dcopt.spread_order`.
    * ``optimizer``: its per-parameter state (Adam's moments) is permuted alike, so
      training continues as if the features had always been in this order. State of
      another shape than its parameter (Adafactor's factored statistics) cannot follow:
      ``ValueError`` before anything moves.
    * ``verify``: the eval-mode outputs on the example inputs before and after must agree
      within ``tol`` (relative to their scale; a float32 difference is recomputed in
      float64 first, :mod:`dcopt.numcheck`); otherwise the permutation is undone and
      :class:`ReorderError` raised.
    """
    dm = as_dynamic_model(model, "reorder_by_importance")
    plan = dm.plan
    names = dm.group_names
    wanted = set(names) if groups is None else set(groups)
    unknown = wanted - set(names)
    if unknown:
        raise KeyError(f"no dynamic group named {sorted(unknown)}; groups: {names}")
    result = Reordered()
    full = _full_width(dm)
    sliced = _slice_groups(plan)
    candidates = {}
    for g, name in enumerate(names):
        if name not in wanted:
            continue
        if not full[g]:
            result.skipped[name] = "not at full width (κ < 1): its kept features would change"
        elif g in sliced:
            result.skipped[name] = "a feature-dim slice in the graph reads its features by position"
        else:
            candidates[g] = True
    layouts: dict[tuple[str, int], dict[int, torch.Tensor]] = {}
    for qual, dims in plan.params.items():
        for d, pos in enumerate(dims):
            if pos is None:
                continue
            for g in [int(x) for x in pos.gid.unique().tolist() if x in candidates]:
                table = _layout(pos, g, plan.groups[g].width)
                if table is None:
                    candidates.pop(g, None)
                    result.skipped[names[g]] = f"{qual} holds only part of it along dim {d}"
                else:
                    layouts.setdefault((qual, d), {})[g] = table
    if not candidates:
        return result
    scores = importance if importance is not None else magnitude_importance(dm)
    perms = {}
    for g in candidates:
        s = torch.as_tensor(scores[names[g]], dtype=torch.float64).cpu()
        if s.shape != (plan.groups[g].width,):
            raise ValueError(f"importance of {names[g]} must have {plan.groups[g].width} entries, got {tuple(s.shape)}")
        perms[g] = torch.argsort(-s, stable=True)
    kept = dm.kept_sizes()
    before = _reference_output(dm, kept, None) if verify else None
    undo = {g: torch.argsort(p) for g, p in perms.items()}
    _check_optimizer_state(dm, layouts, perms, optimizer)
    _apply(dm, layouts, perms, optimizer)
    if verify:
        def float64_before_after():
            # the model is permuted by now: the "before" copy is a copy with the permutation undone
            after, before = _float64_dm(dm), _float64_dm(dm)
            _apply(before, layouts, undo, None)
            return _reference_output(before, kept, None), _reference_output(after, kept, None)

        check = agreement(before, _reference_output(dm, kept, None), tol, float64_before_after)
        if not check.ok:
            _apply(dm, layouts, undo, optimizer)
            raise ReorderError(f"reordering features changed the outputs ({check.describe(tol)}); "
                               "please report this model: it is a dcopt bug")
        result.max_error = float(check.error)
    result.perms = {names[g]: p.tolist() for g, p in perms.items()}
    return result


def _check_optimizer_state(dm, layouts, perms, optimizer) -> None:
    """Refuse, before anything moves, an optimizer whose state for a permuted parameter
    has another shape than the parameter (Adafactor's factored row/column statistics):
    :func:`_apply` permutes state of the parameter's shape and leaves scalars (``step``);
    anything else would silently pair features with another feature's statistics."""
    if optimizer is None:
        return
    for (qual, d), by_group in layouts.items():
        if not any(g in perms and table.numel() for g, table in by_group.items()):
            continue
        t = _lookup(dm.gm, qual)
        for key, v in (optimizer.state.get(t, {}) if isinstance(t, nn.Parameter) else {}).items():
            if isinstance(v, torch.Tensor) and v.numel() > 1 and v.shape != t.shape:
                raise ValueError(
                    f"{type(optimizer).__name__}'s state {key!r} of {qual} has shape {tuple(v.shape)}, not the "
                    f"parameter's {tuple(t.shape)}: reorder_by_importance cannot permute it with the features "
                    "(a factored optimizer such as Adafactor). Reorder before the optimizer has taken a step, or "
                    "pass optimizer=None and build a fresh optimizer afterwards")


def _apply(dm, layouts, perms, optimizer) -> None:
    """Permute every planned tensor (and the optimizer's matching state) along each dim."""
    state = optimizer.state if optimizer is not None else {}
    for (qual, d), by_group in layouts.items():
        t = _lookup(dm.gm, qual)
        idx = torch.arange(t.shape[d])
        for g, table in by_group.items():
            if g not in perms or table.numel() == 0:
                continue
            # position table[c, r] now holds what was at table[perm[c], r]
            idx[table.flatten()] = table[perms[g]].flatten()
        idx = idx.to(t.device)
        t.data = t.data.index_select(d, idx)
        for v in (state.get(t, {}) if isinstance(t, nn.Parameter) else {}).values():
            if isinstance(v, torch.Tensor) and v.shape == t.shape:
                v.data = v.data.index_select(d, idx.to(v.device))
    for module in dm.gm.modules():
        if isinstance(module, nn.RNNBase):
            module._init_flat_weights()
        if isinstance(module, GatedRNN):
            module._sigmas = SigmaCache()   # per-unit σ of the old order: measured afresh
