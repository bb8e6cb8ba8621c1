"""Hand-written multi-head attention: a projection viewed as H heads of D features
(``q.view(B, T, H, D)``) cuts its group into H coupled parts, so the head width D is
learned (every head keeps the same first features) and the q/k/v/out projections shrink."""
import math

import pytest
import torch
from torch import nn

import dcopt

from checks import assert_head_widths_learned, converted_exactly

D, HEADS = 16, 4


class SelfAttention(nn.Module):
    """``how`` spells the head split and merge the ways people write them."""

    def __init__(self, how="view", norm=False):
        super().__init__()
        self.how = how
        self.dh = D // HEADS
        self.inp = nn.Linear(6, D)
        self.norm = nn.LayerNorm(D) if norm else nn.Identity()
        if how == "qkv":
            self.qkv = nn.Linear(D, 3 * D)
        else:
            self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.o = nn.Linear(D, D)
        self.head = nn.Linear(D, 3)

    def heads(self, x):
        B, T, _ = x.shape
        if self.how == "unflatten":
            return x.unflatten(-1, (HEADS, self.dh)).transpose(1, 2)
        if self.how in ("minus_one", "qkv"):
            return x.view(B, -1, HEADS, self.dh).transpose(1, 2)
        return x.view(B, T, HEADS, self.dh).transpose(1, 2)

    def forward(self, x):
        h = self.norm(self.inp(x))
        B, T, _ = h.shape
        if self.how == "qkv":
            q, k, v = self.qkv(h).chunk(3, dim=-1)
            q, k, v = self.heads(q), self.heads(k), self.heads(v)
        else:
            q, k, v = self.heads(self.q(h)), self.heads(self.k(h)), self.heads(self.v(h))
        if self.how == "scale_from_width":   # the width read as a number: q and k keep theirs
            a = torch.softmax(q @ k.transpose(-2, -1) * q.size(-1) ** -0.5, dim=-1)
        else:
            a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.dh), dim=-1)
        y = a @ v
        if self.how == "minus_one":
            y = y.transpose(1, 2).contiguous().view(B, T, -1)
        else:
            y = y.transpose(1, 2).reshape(B, T, HEADS * self.dh)
        return self.head(h + self.o(y))


X = (torch.randn(2, 5, 6),)
OTHERS = [(torch.randn(3, 9, 6),), (torch.randn(1, 1, 6),)]


def _exact(model):
    return converted_exactly(model, X, OTHERS)


@pytest.mark.parametrize("how", ["view", "minus_one", "unflatten"])
def test_head_width_is_learned(how):
    dm = _exact(SelfAttention(how))
    assert_head_widths_learned(dm, HEADS, D // HEADS)


def test_fused_qkv_then_heads():
    dm = _exact(SelfAttention("qkv"))
    assert sorted(g.width for g in dm.plan.groups if g.name.startswith("qkv")) == [D // HEADS, D // HEADS]


def test_head_width_under_a_layernorm_stream():
    """The stream through a LayerNorm is learned too (statistics over the kept features),
    and so is the attention's inner width."""
    dm = _exact(SelfAttention("view", norm=True))
    assert {"inp", "q[0:4]", "v[0:4]"} <= set(dm.group_names)


def test_scale_read_from_the_head_width_keeps_q_and_k():
    dm = _exact(SelfAttention("scale_from_width"))
    assert "v[0:4]" in dm.group_names and not any(n.startswith(("q", "k")) for n in dm.group_names)
