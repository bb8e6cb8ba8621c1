"""Budget mode's last step: integer sizes that meet the budget.

Budget mode (``convert(..., target_macs=t)``) steers the *continuous* sizes s towards
MACs(s) = t by dual ascent, but what eval and export keep are the *integer* sizes ⌈s⌉.
The two differ in both directions, and by more than users expect (VAD CRNN, 4 groups, 10
optimize epochs; benchmarks/results/vad.json before this module, in git history): a 15 % budget ended at 15.6 % kept MACs — every group
rounded up by up to one feature, about 5 % of a 20-wide group — and a 25 % budget at
22 % (the dual had overshot). A user who names a MACs budget for a device wants a model
at most that large and no smaller than it needs to be, so :func:`land_on_budget` ends
the optimize phase by choosing the integer sizes itself:

1. **scale**: the largest common factor c such that the sizes ⌈c·s_g⌉ (each at least its
   κ_min floor, at most its width, rounded up to ``round_to``) keep at most t of the
   MACs — bisection, since kept MACs only grow with c. Scaling every group by one factor
   keeps the allocation the training learned (which group got how much).
2. **fill**: then, while some group can grow by one step and stay within t, grow the one
   furthest below its learned share (smallest k_g / s_g). At the end no group can grow
   without breaking the budget.

``grow=False`` never goes above the sizes training left. ``fit`` uses it when no settle
phase follows in the same call (features switched back on would reach the exported
model without a single step of training at their final sizes), and for the cuts it makes
in the second half of the optimize phase, where the sizes keep training afterwards.

When even every group at its κ_min floor exceeds t, the floors are kept and the landing
says ``met=False`` (fit warns): lower ``kappa_min`` or raise the budget. A model with no
dynamic group has nothing to size: the landing changes nothing, and ``met`` says whether
the model already fits (fit warns that it has no dynamic group when it does not).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .gates import kept_size, round_size

__all__ = ["BudgetLanding", "land_on_budget"]

#: kept MACs count as within the budget up to this relative error (float64 sums)
_REL_TOL = 1e-9


@dataclass(frozen=True)
class BudgetLanding:
    """What :func:`land_on_budget` did. ``before``/``after``: group name → kept width;
    ``macs_before``/``macs_after``: kept MACs as a fraction of the full model's;
    ``met``: ``macs_after`` ≤ ``target``; ``scale``: the common factor of step 1."""
    target: float
    before: dict
    after: dict
    macs_before: float
    macs_after: float
    met: bool
    scale: float

    @property
    def changed(self) -> bool:
        return self.before != self.after


def land_on_budget(dm, target: Optional[float] = None, *, grow: bool = True) -> BudgetLanding:
    """Set ``dm``'s sizes to integers whose kept MACs fraction is at most ``target``
    (default: its ``target_macs``) and that no group can exceed by one step without
    breaking it, keeping the learned proportions (module docstring). ``grow=False``: no
    group ends above its current kept size. Returns what it did; when the sizes change,
    ``dm``'s κ are set so that ``dm.sizes()`` reports exactly the new sizes (otherwise κ
    is left as it was)."""
    cfg = dm.config
    target = cfg.target_macs if target is None else float(target)
    if target is None:
        raise ValueError("land_on_budget needs a target: convert with target_macs=... or pass target=")
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target is a fraction of the full MACs in (0, 1], got {target}")
    info = dm.sizes()
    names = list(info)
    widths = [info[n].width for n in names]
    learned = [max(info[n].s, 1e-9) for n in names]
    before = [info[n].kept for n in names]
    r = cfg.round_to
    floors = [round_size(dm.size_floor(n), w, r) for n, w in zip(names, widths)]   # what set_sizes accepts
    ceilings = before if not grow else widths
    bound = target * (1 + _REL_TOL)

    full = dm._cx.macs_full

    def macs(sizes) -> float:
        return dm._cx.macs_at(sizes) / full if full else 0.0

    def scaled(c: float) -> list[int]:
        return [min(max(kept_size(c * s, w, r), lo), max(hi, lo))
                for s, w, lo, hi in zip(learned, widths, floors, ceilings)]

    macs_before = macs(before)
    if not names:                          # nothing to size: the model is what it is
        return BudgetLanding(target=target, before={}, after={}, macs_before=macs_before, macs_after=macs_before,
                             met=macs_before <= bound, scale=1.0)
    if macs(scaled(0.0)) > bound:          # even the floors break the budget
        c, sizes = 0.0, scaled(0.0)
    else:
        lo, hi = 0.0, max(w / s for w, s in zip(widths, learned))
        if macs(scaled(hi)) <= bound:
            lo = hi
        else:
            for _ in range(60):            # kept MACs are monotone in c
                mid = (lo + hi) / 2
                if macs(scaled(mid)) <= bound:
                    lo = mid
                else:
                    hi = mid
                if hi - lo < 1e-6 * max(1.0, hi):
                    break
        c, sizes = lo, scaled(lo)
        # fill: the group furthest below its learned share first. Kept MACs only grow with
        # any size, so a step that breaks the budget now breaks it after any later step
        # too: such a group is done (each group fails once, which keeps this linear).
        done: set[int] = set()
        while True:
            order = sorted((g for g in range(len(names)) if g not in done),
                           key=lambda g: (sizes[g] / learned[g], g))
            for g in order:
                nxt = round_size(sizes[g] + 1, widths[g], r)
                trial = sizes[:g] + [nxt] + sizes[g + 1:]
                if nxt <= sizes[g] or nxt > max(ceilings[g], floors[g]) or macs(trial) > bound:
                    done.add(g)
                    continue
                sizes = trial
                break
            else:
                break
    if sizes != before:   # unchanged sizes keep their continuous κ (the mid-phase cut relies on it)
        dm.set_sizes(dict(zip(names, sizes)))
    after = macs(sizes)
    return BudgetLanding(target=target, before=dict(zip(names, before)), after=dict(zip(names, sizes)),
                         macs_before=macs_before, macs_after=after, met=after <= bound, scale=c)
