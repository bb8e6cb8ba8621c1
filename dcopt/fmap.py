"""Feature maps: for one dimension of one tensor, which group channel sits at each position.

This is the single representation every rule speaks. A position holds ``(gid, ch)``:
channel ``ch`` of candidate group ``gid``, or ``gid == -1`` for a position whose width is
fixed. Because the map is explicit per position, every shape op is exact by
construction: cat concatenates maps, flatten repeats each entry over a block,
slicing slices the map, a depthwise conv with multiplier ``k`` repeats entries ``k`` times.
Export then keeps exactly the positions whose channel is below the group's kept size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

__all__ = ["Positions", "FMap", "GroupTable", "FIXED"]

FIXED = -1


@dataclass(frozen=True, eq=False)
class Positions:
    """``gid[i], ch[i]`` for every position ``i`` along one dimension (int64 tensors)."""

    gid: torch.Tensor
    ch: torch.Tensor

    @staticmethod
    def group(gid: int, n: int) -> "Positions":
        pos = Positions(torch.full((n,), gid, dtype=torch.long), torch.arange(n))._known({gid} if n and gid >= 0 else set())
        if gid >= 0:
            object.__setattr__(pos, "whole_group", gid)
        return pos

    @staticmethod
    def fixed(n: int) -> "Positions":
        return Positions(torch.full((n,), FIXED, dtype=torch.long), torch.zeros(n, dtype=torch.long))._known(set())

    @staticmethod
    def cat(parts: Sequence["Positions"]) -> "Positions":
        return Positions(torch.cat([p.gid for p in parts]), torch.cat([p.ch for p in parts]))

    def __len__(self) -> int:
        return int(self.gid.numel())

    def __getitem__(self, index) -> "Positions":
        return Positions(self.gid[index], self.ch[index])

    def tile(self, outer: int, inner: int) -> "Positions":
        """Positions after merging this dim with ``outer`` dims before and ``inner`` after."""
        gid = self.gid.repeat_interleave(inner).repeat(outer)
        ch = self.ch.repeat_interleave(inner).repeat(outer)
        return Positions(gid, ch)

    #: ``g`` when these are exactly channels ``0..n-1`` of group ``g`` in order (made by
    #: :meth:`group`), else None; lets the analysis skip tensor work in the common case
    whole_group = None

    def gids(self) -> set[int]:
        """The groups present (a new set)."""
        return set(self._gid_set())

    def _gid_set(self) -> set[int]:
        # computed once: the tensors of a Positions are never changed in place, and the
        # walk asks every map several times
        known = self.__dict__.get("_gids")
        if known is None:
            known = set(torch.unique(self.gid[self.gid >= 0]).tolist())
            object.__setattr__(self, "_gids", known)
        return known

    def _known(self, gids: set) -> "Positions":
        object.__setattr__(self, "_gids", gids)
        return self

    def is_fixed(self) -> bool:
        return not self._gid_set()


@dataclass(frozen=True, eq=False)
class FMap:
    """A tracked tensor: its feature dimension ``dim`` (non-negative) and the positions there."""

    dim: int
    pos: Positions

    def moved(self, dim: int) -> "FMap":
        return FMap(dim, self.pos)


class GroupTable:
    """Candidate groups, coupled by union-find; a group is rejected as a whole.

    Why union-find: a residual add, a multiply by an SE scale, a cat on the batch dim all
    say "these channels are the same channels"; coupling is transitive and can be
    discovered in any order while the graph is walked once.
    """

    def __init__(self):
        self.width: list[int] = []
        self.key: list[str] = []
        self.producers: list[list[str]] = []
        self.parent: list[int] = []
        self._by_key: dict[str, int] = {}

    def new(self, width: int, key: str, producer: str) -> int:
        if key in self._by_key:
            gid = self._by_key[key]
            if producer not in self.producers[gid]:
                self.producers[gid].append(producer)
            return gid
        gid = len(self.width)
        self.width.append(width)
        self.key.append(key)
        self.producers.append([producer])
        self.parent.append(gid)
        self._by_key[key] = gid
        return gid

    def find(self, g: int) -> int:
        root = g
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[g] != root:
            self.parent[g], g = root, self.parent[g]
        return root

    def union(self, a: int, b: int) -> Optional[str]:
        """Couple two groups; returns a reason string when they cannot be coupled."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return None
        if self.width[ra] != self.width[rb]:
            return f"couples groups of different widths ({self.width[ra]} and {self.width[rb]})"
        if rb < ra:
            ra, rb = rb, ra
        self.parent[rb] = ra
        return None

    def __len__(self) -> int:
        return len(self.width)

    def roots(self) -> list[int]:
        return sorted({self.find(g) for g in range(len(self))})
