"""One small test per op rule grown for real architectures: each is exact after export, or rejected."""
import random

import torch
from torch import nn

import dcopt
from checks import assert_exact_export


def roundtrip(model, inputs, seed=0):
    """convert → random sizes → export, checked exact (outputs, MACs, params); returns the analysis."""
    model.eval()
    dm = dcopt.convert(model, inputs)
    rng = random.Random(seed)
    assert_exact_export(dm, inputs, {g.name: rng.randint(1, g.width) for g in dm.plan.groups})
    return dm.analysis


class SE(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc1 = nn.Conv2d(8, 2, 1)
        self.fc2 = nn.Conv2d(2, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.conv(x)
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(nn.functional.adaptive_avg_pool2d(x, 1)))))
        return self.head(x * s)


def test_squeeze_excitation_couples_scale_with_features():
    a = roundtrip(SE(), (torch.randn(2, 3, 6, 6),))
    g = a.group("conv")
    assert g.status == "dynamic" and set(g.producers) == {"conv", "fc2"}
    assert a.group("fc1").status == "dynamic"


class LayerScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.gamma = nn.Parameter(torch.rand(8, 1, 1))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head((self.conv(x) * self.gamma).mean((2, 3)))


def test_layer_scale_parameter_is_sliced_and_spatial_mean_kept():
    a = roundtrip(LayerScale(), (torch.randn(2, 3, 6, 6),))
    assert a.group("conv").status == "dynamic"
    assert "gamma" in a.plan.params


class Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.conv(x).view(b, 2, 4, h, w).transpose(1, 2).reshape(b, 8, h, w)
        return self.head(y)


def test_channel_shuffle_of_one_layer_keeps_the_blocks_coupled():
    """view(b, 2, 4, h, w) cuts the conv's channels into 2 blocks (as attention heads),
    coupled: each block keeps the same first channels, and the shuffle back interleaves
    them exactly (the export keeps channels j and 4 + j together)."""
    x = (torch.randn(2, 3, 4, 4),)
    dm = dcopt.convert(Shuffle(), x, kappa_min=0.01)
    assert {g.name: g.width for g in dm.plan.groups} == {"conv[0:4]": 4}
    for n in (1, 3):
        small = assert_exact_export(dm, x, {"conv[0:4]": n}, others=[(torch.randn(3, 3, 6, 5),)])
        assert small.conv.out_channels == 2 * n


class ShuffleOfCat(nn.Module):
    """ShuffleNet's shuffle: the blocks cut a concatenation of two layers' outputs."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 5, 1)
        self.b = nn.Conv2d(3, 3, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        b_, c, h, w = x.shape
        y = torch.cat([self.a(x), self.b(x)], 1)
        return self.head(y.view(b_, 2, 4, h, w).transpose(1, 2).reshape(b_, 8, h, w))


def test_channel_shuffle_across_a_cat_is_rejected_with_reason():
    a = dcopt.analyze(ShuffleOfCat(), (torch.randn(1, 3, 4, 4),))
    assert a.group("a").status == "rejected"
    assert any("falls inside one of the groups" in r.reason for r in a.unsupported), a.unsupported


class AttentionMLP(nn.Module):
    """A transformer block: attention keeps the stream fixed; the MLP hidden width is dynamic."""

    def __init__(self, d=8):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 32)
        self.fc2 = nn.Linear(32, d)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))


def test_attention_block_mlp_is_dynamic():
    a = roundtrip(AttentionMLP(), (torch.randn(2, 5, 8),))
    assert [g.name for g in a.dynamic_groups] == ["fc1"]


class Accumulate(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 1)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def test_gradient_accumulation_over_two_forwards():
    dm = dcopt.convert(Accumulate(), (torch.randn(3, 4),)).optimize_sizes().train()
    a = dm(torch.randn(3, 4)).sum()
    b = dm(torch.randn(3, 4)).sum()
    (a + b).backward()
    assert all(k.grad is not None for k in dm.size_parameters())


def test_subclass_overriding_forward_gets_no_base_rule():
    class Doubled(nn.Linear):
        def forward(self, x):
            return super().forward(x).flip(-1)

    model = nn.Sequential(nn.Linear(3, 6), Doubled(6, 6), nn.Linear(6, 2))
    a = dcopt.analyze(model, (torch.randn(2, 3),))
    # the subclass is traced into (F.linear on its weight, then flip): no rule may claim it is
    # a plain Linear, so the group feeding it stays fixed
    assert a.group("0").status == "rejected" and [g.name for g in a.groups] == ["0", "2"]
    roundtrip(model, (torch.randn(2, 3),))


def test_stochastic_depth_is_a_passthrough_leaf():
    from torchvision.ops import StochasticDepth

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 1)
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.sd = StochasticDepth(0.2, "row")
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            x = self.stem(x)
            return self.head(x + self.sd(self.conv(x)))

    model = Block().train()
    a = roundtrip(model, (torch.randn(2, 3, 5, 5),))
    assert a.group("stem").status == "dynamic"
    assert a.roles["sd"] == "ACL"


class TiedWeight(nn.Module):
    """fc's weight is also read by a functional op without a rule: it must keep its shape."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        h = torch.relu(self.fc(x))
        return self.out(h) + nn.functional.linear(x, self.fc.weight).sum(-1, keepdim=True)


def test_parameter_read_by_unknown_op_is_pinned():
    a = dcopt.analyze(TiedWeight(), (torch.randn(3, 4),))
    assert a.group("fc").status == "rejected"
    assert any("fc.weight is read by" in r.reason for r in a.unsupported)
    roundtrip(TiedWeight(), (torch.randn(3, 4),))


def test_unknown_op_receiving_a_tuple_rejects_its_groups():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = nn.GRU(3, 5, batch_first=True)
            self.out = nn.Linear(5, 1)

        def forward(self, x):
            y = self.gru(x)
            return self.out(torch.cat(y[0].unbind(1), 0))

    a = dcopt.analyze(M(), (torch.randn(2, 4, 3),))
    assert a.group("gru").status in ("dynamic", "rejected")
    roundtrip(M(), (torch.randn(2, 4, 3),))
