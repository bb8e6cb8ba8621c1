"""MACs and parameter counts as differentiable functions of the group sizes.

Every parameter dcopt may slice is described by the positions along each of its dims;
its element count is the product of the kept widths. Every MAC-bearing node the
analysis accepted scales as ``coef · Σ numel(weights) · Π extra widths`` (Linear:
positions·in·out; Conv: batch·out-area·numel(weight); GRU/LSTM: steps·batch·Σ numel of
the weight matrices). So one mechanism counts both, and at integer sizes it equals
what ``FlopCounterMode`` measures on the exported model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .fmap import Positions
from .plan import Plan

__all__ = ["Complexity", "ComplexityModel"]


@dataclass
class Complexity:
    """MACs and parameters at the sizes asked about, and at full width."""
    macs: torch.Tensor
    params: torch.Tensor
    macs_full: int
    params_full: int

    @property
    def macs_fraction(self) -> torch.Tensor:
        return self.macs / self.macs_full if self.macs_full else self.macs * 0

    @property
    def params_fraction(self) -> torch.Tensor:
        return self.params / self.params_full if self.params_full else self.params * 0


class _Width:
    """Kept count of one Positions, precomputed per group for speed."""

    __slots__ = ("full", "fixed", "parts", "_cum")

    def __init__(self, pos: Optional[Positions], full: int, widths: Sequence[int] = ()):
        self.full = full
        self._cum = None
        if pos is None:
            self.fixed, self.parts = float(full), []
            return
        self.fixed = float((pos.gid < 0).sum())
        self.parts = []
        for g in sorted(pos.gids()):
            ch = pos.ch[pos.gid == g]
            mult = torch.bincount(ch, minlength=widths[g]).to(torch.float64)
            self.parts.append((g, ch.to(torch.float64), mult, widths[g]))

    def at(self, sizes: Sequence[int]) -> int:
        """Kept count at integer sizes, in plain Python: the positions whose channel is
        below its group's size (what ``__call__`` gives at integer sizes, without a
        tensor op per group)."""
        if self._cum is None:
            self._cum = [(g, [0] + torch.cumsum(mult, 0).long().tolist(), width)
                         for g, _, mult, width in self.parts]
        total = int(self.fixed)
        for g, cum, width in self._cum:
            total += cum[max(0, min(int(sizes[g]), width))]
        return total

    def __call__(self, s: Sequence[torch.Tensor]) -> torch.Tensor:
        """Kept count at sizes ``s``: channel c counts by clamp(s − c, 0, 1). The gradient
        is that of the boundary channel m = min(⌊s⌋, N−1) (the one the gate makes noisy),
        so it is never zero at integer sizes, where clamp's own gradient would vanish."""
        total = torch.tensor(self.fixed, dtype=torch.float64)
        for g, ch, mult, width in self.parts:
            sd = s[g].detach()
            value = (sd - ch).clamp(0.0, 1.0).sum()
            m = int(min(float(torch.floor(sd)), width - 1))
            total = total + value + (s[g] - sd) * mult[m]
        return total


class ComplexityModel:
    def __init__(self, plan: Plan, param_shapes: dict[str, tuple]):
        self.plan = plan
        widths = [g.width for g in plan.groups]
        self.dims: dict[str, list[_Width]] = {}
        for q, dims in plan.params.items():
            shape = param_shapes[q]
            self.dims[q] = [_Width(d, n, widths) for d, n in zip(dims, shape)]
        self.const_params = sum(n for q, n in plan.param_numel.items() if q not in self.dims)
        self.params_full = sum(plan.param_numel.values())
        self.terms = [(t.coef, t.params, [_Width(e, len(e), widths) for e in t.extra], t.vanish_at_one)
                      for t in plan.mac_terms]
        self.macs_full = plan.total_macs
        self.param_shapes = param_shapes

    def _numel(self, q: str, width):
        """Kept element count of parameter ``q``; ``width(w)`` evaluates one _Width (a
        differentiable tensor in :meth:`__call__`, a plain int in :meth:`macs_at`)."""
        if q in self.dims:
            return math.prod(width(w) for w in self.dims[q])
        return math.prod(self.param_shapes[q])

    def _macs(self, width):
        """Σ coef · Σ numel(params) · Π extra widths over the MAC terms, plus the constant.
        A term whose ``vanish_at_one`` width is 1 counts 0 (:class:`~dcopt.plan.MacTerm`);
        the factor is a step, so it carries no gradient."""
        macs = self.plan.const_macs
        for coef, quals, extra, vanish in self.terms:
            term = sum(self._numel(q, width) for q in quals) if quals else 1
            for i, w in enumerate(extra):
                n = width(w)
                term = term * n
                if i in vanish:
                    term = term * ((n.detach() if isinstance(n, torch.Tensor) else n) > 1)
            macs = macs + coef * term
        return macs

    def macs_at(self, sizes: Sequence[int]) -> int:
        """Kept MACs at integer sizes, exactly and in plain Python: the same terms as
        :meth:`__call__` (which is differentiable, and far slower where a search needs
        hundreds of evaluations: 85 ms a call on densenet121, one-off)."""
        return self._macs(lambda w: w.at(sizes))

    def __call__(self, s: Sequence[torch.Tensor]) -> Complexity:
        s = [x.to(torch.float64).reshape(()) for x in s]

        def width(w):
            return w(s)

        params = torch.tensor(float(self.const_params), dtype=torch.float64)
        for q in self.dims:
            if q in self.plan.param_numel:  # buffers (BN statistics) are sliced but are not parameters
                params = params + self._numel(q, width)
        macs = torch.as_tensor(self._macs(width), dtype=torch.float64)
        return Complexity(macs=macs, params=params, macs_full=self.macs_full, params_full=self.params_full)
