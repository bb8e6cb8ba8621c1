"""Feature order for groups whose features are not interchangeable.

dcopt keeps the *first* ⌈s⌉ features of a group (DESIGN.md, consolidation). For features
made by a freshly initialised layer that is harmless: their order is arbitrary, and
training decides what each one carries. It is not harmless when the initialisation gives
the features an order with a meaning: a filter bank initialised as mel bands sorted by
frequency keeps only the *lowest* bands. On the VAD CRNN (80 mel bands), a 25 % MACs budget
kept bands 0–30, i.e. 0–1.2 kHz, and the low-SNR clips, whose noise sits mostly at low
frequencies, lost most (benchmarks/vad.py).

:func:`spread_order` is a permutation of ``range(n)`` each of whose prefixes is spread
over the whole range; initialise such a layer in that order (e.g. ``fb.weight.copy_(
mel[spread_order(80)])``) and every size the group can take keeps bands across the whole
spectrum. At full width the model is the same up to a relabelling of its features.

Spread *narrow* bands still leave gaps between them; :func:`spread_reach` gives each band
the width that closes them, so every prefix covers the whole range.
"""
from __future__ import annotations

import functools
import heapq

__all__ = ["spread_order", "spread_reach"]


def spread_order(n: int) -> list[int]:
    """A permutation of ``range(n)`` whose every prefix of length k leaves no gap wider than
    3n/k between consecutive chosen indices, counting from −1 before the first and to n
    after the last (property-tested).

    Greedy farthest-point order on the line: the first index is the middle one, each
    next one the index farthest from all chosen ones (the lowest on a tie), which halves
    the widest gap. Deterministic; O(n log n).
    """
    return [i for i, _ in _spread(n)]


def spread_reach(n: int) -> list[int]:
    """For each index of :func:`spread_order` (same positions), its *reach*: the distance
    to the nearest index chosen before it (the first: far enough to span all of
    ``range(n)``). Non-increasing along the order.

    Why: keeping the first k spread bands of a filter bank whose bands are all narrow
    leaves gaps between them (a 24-of-80 prefix of narrow mel bands sees 127 of a 512-point
    FFT's 257 bins). Give index i a band reaching ``reach[i]`` neighbouring centres
    to each side instead, and every prefix covers the whole range: every position lies
    strictly within the reach of some chosen index (property-tested). At full width such
    a bank is multi-resolution (one band over everything, two over halves, …, the rest
    one centre wide) instead of uniform; benchmarks/vad.py measures what that costs.
    """
    return [r for _, r in _spread(n)]


@functools.lru_cache(maxsize=64)
def _spread(n: int) -> tuple[tuple[int, int], ...]:
    """(index, reach) in spread order; see :func:`spread_order` and :func:`spread_reach`.
    Cached: callers ask for both lists of the same ``n`` (a filter bank's order and reach)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n == 0:
        return ()
    first = (n - 1) // 2
    out = [(first, max(first + 1, n - first))]
    # gaps as (priority, lo, hi): the open interval (lo, hi) of unchosen indices between
    # chosen ones, with -1 and n as sentinels; priority: the best point's distance to the
    # nearer end (an end that is a sentinel does not count as chosen) — its reach
    heap: list[tuple[int, int, int, int]] = []

    def push(lo: int, hi: int) -> None:
        if hi - lo < 2:
            return
        if lo < 0:
            best, dist = lo + 1, hi - (lo + 1)     # the left end: as far as possible from hi
        elif hi >= n:
            best, dist = hi - 1, (hi - 1) - lo
        else:
            best = (lo + hi) // 2
            dist = min(best - lo, hi - best)
        heapq.heappush(heap, (-dist, best, lo, hi))

    push(-1, first)
    push(first, n)
    while heap:
        neg, best, lo, hi = heapq.heappop(heap)
        out.append((best, -neg))
        push(lo, best)
        push(best, hi)
    return tuple(out)
