"""spread_order: a permutation whose every prefix covers the whole range."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dcopt


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 400))
def test_every_prefix_is_spread(n):
    order = dcopt.spread_order(n)
    assert sorted(order) == list(range(n))
    for k in range(1, n + 1):
        kept = sorted(order[:k])
        gaps = [b - a for a, b in zip([-1] + kept, kept + [n])]
        assert max(gaps) <= 3 * n / k


def test_small_orders_and_errors():
    assert dcopt.spread_order(1) == [0]
    assert dcopt.spread_order(5)[:3] == [2, 0, 4]      # middle, then the two ends
    with pytest.raises(ValueError):
        dcopt.spread_order(-1)


def test_a_spread_mel_bank_keeps_bands_across_the_spectrum():
    """The reason it exists: the first quarter of a frequency-sorted bank stops at a
    quarter of the mel range; in spread order it reaches both ends."""
    n = 40
    centres = torch.arange(n)                        # band i peaks at mel position i
    spread = centres[dcopt.spread_order(n)][: n // 4]
    assert centres[: n // 4].max() < n // 4
    assert spread.min() == 0 and spread.max() == n - 1


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300))
def test_every_prefix_covers_the_range_within_its_reach(n):
    """spread_reach: every position lies strictly within the reach of an index of every
    prefix, and the reach never grows along the order (later bands are narrower)."""
    order, reach = dcopt.spread_order(n), dcopt.spread_reach(n)
    assert len(reach) == n and all(r >= 1 for r in reach)
    assert all(a >= b for a, b in zip(reach, reach[1:]))
    nearest = [None] * n               # per position: the best margin reach − distance so far
    for k, (c, r) in enumerate(zip(order, reach), start=1):
        for x in range(n):
            m = r - abs(x - c)
            nearest[x] = m if nearest[x] is None else max(nearest[x], m)
        assert min(nearest) > 0, (k, nearest)


def test_reach_is_the_gap_each_index_halves():
    assert dcopt.spread_reach(5) == [3, 2, 2, 1, 1]          # order 2, 0, 4, 1, 3
    assert dcopt.spread_reach(1) == [1] and dcopt.spread_reach(0) == []
    with pytest.raises(ValueError):
        dcopt.spread_reach(-1)
