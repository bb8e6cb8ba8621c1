"""The conversion plan: what the analysis proved, as plain picklable data.

Rewrite, complexity and export read only this. Positions here use *live* group
indices (0..G-1); positions of fixed or rejected groups are already ``FIXED``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .fmap import Positions

__all__ = ["GroupSpec", "GateSpec", "MacTerm", "Plan", "keep_index", "keep_mask", "size_limits"]


@dataclass
class GroupSpec:
    name: str          # readable: the first producer's qualified name
    key: str           # attribute-safe name of its size parameter
    width: int         # N
    producers: list[str]
    consumers: list[str] = field(default_factory=list)


@dataclass
class GateSpec:
    source: str        # node whose output is gated
    dim: int
    pos: Positions
    consumers: list[str]


@dataclass
class MacTerm:
    """MACs of one node: ``coef * sum(numel(p) for p in params) * prod(width(e) for e in extra)``
    where ``numel`` and ``width`` are taken at the sizes being asked about — and 0 where an
    entry of ``extra`` listed in ``vanish_at_one`` keeps a width of 1 (an einsum whose
    summed feature index has one entry: torch runs a broadcast multiply there, which its
    counter does not count)."""
    node: str
    coef: float
    params: list[str]
    extra: list = field(default_factory=list)
    vanish_at_one: list[int] = field(default_factory=list)


@dataclass
class Plan:
    groups: list[GroupSpec]
    params: dict[str, tuple]            # qualified param/buffer name -> per-dim Positions or None
    attrs: dict[str, dict[str, tuple]]  # module target -> attr -> (kind, Positions)
    rewrites: dict[str, dict]           # node name -> rewrite spec
    gates: list[GateSpec]
    rnns: dict[str, Positions]          # RNN module target -> positions of its hidden units (one block of H)
    mac_terms: list[MacTerm]
    const_macs: int
    total_macs: int
    param_numel: dict[str, int]         # every parameter of the model -> numel at full size
    norms: dict[str, Positions] = field(default_factory=dict)   # LayerNorm/RMSNorm target -> its features (MaskedNorm)
    fnorms: dict[str, Positions] = field(default_factory=dict)  # F.layer_norm/F.rms_norm node -> its features

    def live(self) -> bool:
        return bool(self.groups)


def size_limits(sizes: list[int]) -> torch.Tensor:
    """The kept size of each group, then 0 for fixed positions (gid < 0). Build it once per
    set of sizes and pass it to :func:`keep_mask`: rebuilding it per tensor made export
    quadratic in the number of groups (1000 layers took 6 s)."""
    return torch.tensor(list(sizes) + [0], dtype=torch.long)


def keep_mask(pos: Positions, limits: torch.Tensor) -> torch.Tensor:
    """Bool mask of the positions kept when group ``g`` keeps its first ``limits[g]``
    channels (``limits`` from :func:`size_limits`); fixed positions are always kept."""
    gid = torch.where(pos.gid < 0, torch.full_like(pos.gid, limits.numel() - 1), pos.gid)
    return (pos.gid < 0) | (pos.ch < limits[gid])


def keep_index(pos: Positions, limits: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(keep_mask(pos, limits), as_tuple=False).flatten()
