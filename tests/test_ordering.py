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
