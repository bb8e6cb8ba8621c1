"""``F.scaled_dot_product_attention``: q's and k's features are summed over (coupled and
gated, as in a matmul), v's come through; its MACs are c·(E + Ev), a sum over two groups;
torch's default scale 1/sqrt(E) is written into the export, which would otherwise read it
from the shrunken width."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dcopt

from checks import assert_head_widths_learned, converted_exactly

D, HEADS = 16, 4


class Attention(nn.Module):
    """``how`` picks the call as people write it."""

    def __init__(self, how="heads", kv_heads=HEADS):
        super().__init__()
        self.how, self.kv_heads = how, kv_heads
        self.dh = D // HEADS
        self.inp = nn.Linear(6, D)
        self.q = nn.Linear(D, D)
        self.k = nn.Linear(D, self.dh * kv_heads)
        self.v = nn.Linear(D, self.dh * kv_heads)
        self.o = nn.Linear(D, D)
        self.head = nn.Linear(D, 3)
        self.memory = nn.Parameter(torch.randn(1, 1, 7, self.dh))
        self.register_buffer("mask", torch.ones(16, 16, dtype=torch.bool).tril())

    def forward(self, x):
        h = self.inp(x)
        B, T, _ = h.shape
        if self.how == "flat":       # one head: (B, T, E) straight into attention
            y = F.scaled_dot_product_attention(self.q(h), self.k(h), self.v(h))
            return self.head(h + self.o(y))
        q = self.q(h).view(B, T, HEADS, self.dh).transpose(1, 2)
        k = self.k(h).view(B, T, self.kv_heads, self.dh).transpose(1, 2)
        v = self.v(h).view(B, T, self.kv_heads, self.dh).transpose(1, 2)
        if self.how == "heads":
            y = F.scaled_dot_product_attention(q, k, v)
        elif self.how == "causal_dropout":
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=True)
        elif self.how == "mask":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask[:T, :T])
        elif self.how == "scale_given":
            y = F.scaled_dot_product_attention(q, k, v, scale=0.3)
        elif self.how == "positional":
            y = F.scaled_dot_product_attention(q, k, v, None, 0.0, True)
        elif self.how == "scale_from_width":
            y = F.scaled_dot_product_attention(q, k, v, scale=q.size(-1) ** -0.5)
        elif self.how == "gqa":
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        elif self.how == "repeat_interleave":   # grouped-query heads shared by hand
            n = HEADS // self.kv_heads
            y = F.scaled_dot_product_attention(q, k.repeat_interleave(n, dim=1), torch.repeat_interleave(v, n, 1))
        elif self.how == "repeat_kv":   # the same as Llama writes it: expand a new dim, merge it
            def rep(a):
                b, kv, s, d = a.shape
                n = HEADS // kv
                return a[:, :, None, :, :].expand(b, kv, n, s, d).reshape(b, kv * n, s, d)
            y = F.scaled_dot_product_attention(q, rep(k), rep(v))
        elif self.how == "memory_keys":   # keys from a parameter: q is summed against fixed features
            mem = self.memory.expand(B, HEADS, -1, -1)
            y = F.scaled_dot_product_attention(q, mem, mem)
            y = y.expand(-1, -1, -1, -1)
            return self.head(h + y.mean(dim=(1, 2)).repeat(1, HEADS).unsqueeze(1) * h)
        elif self.how == "across_features":   # attention between features (XCiT): they sit on L and S
            t = [a.transpose(-1, -2) for a in (q, k, v)]
            y = F.scaled_dot_product_attention(*t).transpose(-1, -2)
        else:
            raise ValueError(self.how)
        y = y.transpose(1, 2).reshape(B, T, D)
        return self.head(h + self.o(y))


X = (torch.randn(2, 5, 6),)
OTHERS = [(torch.randn(3, 9, 6),), (torch.randn(1, 1, 6),)]


def _exact(model, inputs=X, others=OTHERS):
    return converted_exactly(model, inputs, others)


@pytest.mark.parametrize("how", ["heads", "causal_dropout", "mask", "scale_given", "positional"])
def test_head_widths_are_learned_through_attention(how):
    dm = _exact(Attention(how))
    assert_head_widths_learned(dm, HEADS, D // HEADS)


def test_grouped_query_attention():
    dm = _exact(Attention("gqa", kv_heads=2))
    dm.set_sizes({"q[0:4]": 2, "v[0:4]": 1})
    small = dcopt.export(dm)
    assert small.k.out_features == 2 * 2 and small.v.out_features == 2 * 1 and small.o.in_features == HEADS


@pytest.mark.parametrize("how", ["repeat_interleave", "repeat_kv"])
def test_key_value_heads_repeated_by_hand(how):
    dm = _exact(Attention(how, kv_heads=2))
    dm.set_sizes({"q[0:4]": 3, "v[0:4]": 2})
    small = dcopt.export(dm)
    assert small.k.out_features == 2 * 3 and small.v.out_features == 2 * 2 and small.o.in_features == HEADS * 2


def test_repeat_interleave_along_the_features_keeps_them():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 4), nn.Linear(8, 3)

        def forward(self, x):
            return self.b(self.a(x).repeat_interleave(2, dim=-1))

    a = dcopt.analyze(M(), X)
    assert not a.dynamic_groups and "repeats along the feature dimension" in a.rejections[0].reason


def test_one_head_without_views():
    dm = _exact(Attention("flat"))
    assert {"q", "v"} <= set(dm.group_names)


def test_the_default_scale_is_written_into_the_export():
    """Without it the export would scale by 1/sqrt(2) instead of 1/sqrt(4): the same
    weights, sharper attention. The gated model (full width) used 1/sqrt(4)."""
    dm = _exact(Attention("heads"))
    dm.set_sizes({"q[0:4]": 2, "v[0:4]": 4})
    small = dcopt.export(dm)
    calls = [n for n in small.graph.nodes if n.target is F.scaled_dot_product_attention]
    assert len(calls) == 1 and calls[0].kwargs["scale"] == pytest.approx(1 / math.sqrt(D // HEADS))


def test_a_given_scale_is_kept():
    dm = _exact(Attention("scale_given"))
    assert not any(spec["kind"] == "set_kwarg" for spec in dm.plan.rewrites.values())
    dm.set_sizes({"q[0:4]": 2})
    calls = [n for n in dcopt.export(dm).graph.nodes if n.target is F.scaled_dot_product_attention]
    assert calls[0].kwargs["scale"] == 0.3


def test_one_head_exports_as_the_users_class_only_without_the_default_scale():
    """The flat call needs no view rewritten; only the scale makes it a GraphModule."""
    dm = _exact(Attention("flat"))
    dm.set_sizes({"q": 3})
    assert [spec["kind"] for spec in dm.plan.rewrites.values()] == ["set_kwarg"]
    assert isinstance(dcopt.export(dm), torch.fx.GraphModule)


def test_macs_are_a_sum_over_the_two_groups():
    dm = dcopt.convert(Attention("heads"), X)
    full = dm.complexity("kept").macs.item()
    dm.set_sizes({"q[0:4]": 1, "v[0:4]": 4})
    only_qk = full - dm.complexity("kept").macs.item()
    dm.set_sizes({"q[0:4]": 4, "v[0:4]": 1})
    only_v = full - dm.complexity("kept").macs.item()
    # attention itself: B·H·T·T per feature of q·kᵀ and of attention·v; the projections
    # q and k (two of them) against v and o (two): the same per-feature cost each side
    assert only_qk == only_v > 0
    dm.set_sizes({"q[0:4]": 1, "v[0:4]": 1})
    assert full - dm.complexity("kept").macs.item() == pytest.approx(only_qk + only_v)


def test_scale_read_from_the_width_keeps_q_and_k():
    dm = _exact(Attention("scale_from_width"))
    assert "v[0:4]" in dm.group_names and not any(n.startswith(("q", "k")) for n in dm.group_names)


def test_keys_from_a_parameter_keep_the_query():
    a = dcopt.analyze(Attention("memory_keys"), X)
    reasons = " ".join(r.reason for r in a.rejections if r.group.startswith("q"))
    assert "fixed-width tensor" in reasons
    assert not any(g.name.startswith("q") for g in a.dynamic_groups)


def test_features_on_a_sequence_dim_keep_their_width():
    a = dcopt.analyze(Attention("across_features"), X)
    for name in ("q", "v"):
        assert any("sequence dim" in r.reason for r in a.rejections if r.group.startswith(name))
        assert not any(g.name.startswith(name) for g in a.dynamic_groups)
    _exact(Attention("across_features"))


class RandomInEval(Attention):
    """``dropout_p`` given as a constant: SDPA has no training flag, so it drops in eval too."""

    def forward(self, x):
        h = self.inp(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        return self.head(h + self.o(F.scaled_dot_product_attention(q, k, v, dropout_p=0.3)))


def test_a_model_random_in_eval_is_named_not_blamed_on_dcopt():
    with pytest.warns(UserWarning, match=r"random numbers in eval mode \('scaled_dot_product_attention'.*test_sdpa.py"):
        dm = dcopt.convert(RandomInEval("flat"), X)
    dm.set_sizes({"q": 2})
    with pytest.raises(dcopt.ExportError, match="random numbers in eval mode") as err:
        dcopt.export(dm)
    assert "dcopt bug" not in str(err.value)
    assert dcopt.export(dm, verify=False).q.out_features == 2


def test_a_deterministic_model_is_not_called_random(recwarn):
    dcopt.convert(Attention("heads"), X)
    assert not [w for w in recwarn if "random" in str(w.message)]
