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

    Refinement: a split of the feature dim (``chunk``, ``split``, GLU) cuts a group into
    parts that keep their own sizes. ``refine`` records that a root's channels are the
    concatenation of narrower groups (``parts``); positions recorded before the cut keep
    naming the old group and are resolved to the parts (:meth:`resolve`) when they are
    read. A refined class stays one class: coupling it with another refines both to the
    common cuts and couples the pieces one by one, so coupling stays transitive; a
    rejection of a group covers every piece under it (:meth:`leaves`), a rejection of a
    piece only that piece. Parts are strictly narrower than what they cut, and only groups
    of equal width are coupled, so the parts never form a cycle.
    """

    def __init__(self):
        self.width: list[int] = []
        self.key: list[str] = []
        self.producers: list[list[str]] = []
        self.parent: list[int] = []
        self._by_key: dict[str, int] = {}
        #: root -> [(offset, gid), ...] in channel order: a refined root's channels
        self.parts: dict[int, list[tuple[int, int]]] = {}
        #: piece -> (key, producer, offset) of the group it was first cut from
        self._span: dict[int, tuple[str, str, int]] = {}

    def new(self, width: int, key: str, producer: str) -> int:
        if key in self._by_key:
            gid = self._by_key[key]
            if producer not in self.producers[gid]:
                self.producers[gid].append(producer)
            return gid
        gid = self._append(width, key, producer)
        self._by_key[key] = gid
        return gid

    def _append(self, width: int, key: str, producer: str) -> int:
        gid = len(self.width)
        self.width.append(width)
        self.key.append(key)
        self.producers.append([producer])
        self.parent.append(gid)
        return gid

    def find(self, g: int) -> int:
        root = g
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[g] != root:
            self.parent[g], g = root, self.parent[g]
        return root

    def union(self, a: int, b: int) -> Optional[str]:
        """Couple two groups; returns a reason string when they cannot be coupled.

        Refined groups are first refined to the same cuts (repeated until both sides agree:
        a cut of one piece also cuts the pieces coupled with it), then coupled piece by
        piece; the roots are linked too, so ``find`` still says "one class"."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return None
        if self.width[ra] != self.width[rb]:
            return f"couples groups of different widths ({self.width[ra]} and {self.width[rb]})"
        if ra in self.parts or rb in self.parts:
            while True:
                la, lb = self.leaves(ra), self.leaves(rb)
                ca, cb = {o for o, _ in la}, {o for o, _ in lb}
                if ca == cb:
                    break
                self.refine(ra, cb)
                self.refine(rb, ca)
            for (_, x), (_, y) in zip(la, lb):
                self.union(x, y)   # unrefined pieces of equal width: a plain link
        if rb < ra:
            ra, rb = rb, ra
        self.parent[rb] = ra
        if ra not in self.parts and rb in self.parts:
            self.parts[ra] = self.parts[rb]
        return None

    def refine(self, g: int, cuts) -> None:
        """Cut ``g``'s class at channel offsets ``cuts`` (relative to ``g``): afterwards a
        piece boundary lies at each of them. An unrefined root gets new pieces; a refined
        one passes each cut to the part it falls in."""
        r = self.find(g)
        n = self.width[r]
        cuts = sorted({int(c) for c in cuts if 0 < c < n})
        if not cuts:
            return
        parts = self.parts.get(r)
        if parts is None:
            bounds = [0] + cuts + [n]
            key, name, base = self._span.get(r, (self.key[r], self.producers[r][0], 0))
            pieces = []
            for lo, hi in zip(bounds, bounds[1:]):
                a, b = base + lo, base + hi
                gid = self._append(hi - lo, f"{key}[{a}:{b}]", f"{name}[{a}:{b}]")
                self._span[gid] = (key, name, a)   # a piece of a piece is named by the original's channels
                pieces.append((lo, gid))
            self.parts[r] = pieces
            return
        ends = [off for off, _ in parts[1:]] + [n]
        for (off, p), end in zip(parts, ends):
            self.refine(p, [c - off for c in cuts if off < c < end])

    def leaves(self, g: int) -> list[tuple[int, int]]:
        """``[(offset, leaf root), ...]``: the unrefined groups whose concatenation ``g`` is now."""
        r = self.find(g)
        parts = self.parts.get(r)
        if parts is None:
            return [(0, r)]
        return [(off + o, leaf) for off, p in parts for o, leaf in self.leaves(p)]

    def refined(self) -> bool:
        return bool(self.parts)

    def resolve(self, pos: "Positions") -> "Positions":
        """``pos`` with every channel of a refined group named by its piece (leaf root,
        channel within it). Unchanged (the very object) where nothing was refined."""
        if not self.parts:
            return pos
        gid, ch = pos.gid.clone(), pos.ch.clone()
        changed = False
        for g in pos.gids():
            lv = self.leaves(g)
            if len(lv) == 1:
                continue
            changed = True
            sel = pos.gid == g
            offs = torch.tensor([o for o, _ in lv], dtype=torch.long)
            leaf = torch.tensor([x for _, x in lv], dtype=torch.long)
            i = torch.searchsorted(offs, pos.ch[sel], right=True) - 1
            gid[sel] = leaf[i]
            ch[sel] = pos.ch[sel] - offs[i]
        return Positions(gid, ch) if changed else pos

    def __len__(self) -> int:
        return len(self.width)

    def roots(self) -> list[int]:
        return sorted({self.find(g) for g in range(len(self))})

    def leaf_roots(self) -> list[int]:
        """The roots that are groups of their own: every root not cut into pieces."""
        return [r for r in self.roots() if r not in self.parts]
