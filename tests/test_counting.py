"""MAC counting sees the fused CPU attention kernels torch's FlopCounterMode misses."""
import operator
import random

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import dcopt
from checks import assert_exact_export


def _mha_formula(b, lq, s, e):
    """q, k, v in-projections + QKᵀ + attention·V + out-projection, in MACs."""
    return b * (lq + 2 * s) * e * e + 2 * b * lq * s * e + b * lq * e * e


class _Attend(nn.Module):
    def __init__(self, e=32, heads=4, batch_first=True):
        super().__init__()
        self.mha = nn.MultiheadAttention(e, heads, batch_first=batch_first)

    def forward(self, q, kv):
        return self.mha(q, kv, kv, need_weights=False)[0]


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("cross", [False, True])
def test_mha_fast_path_counts_what_the_slow_path_does(batched, cross):
    torch.manual_seed(0)
    m = _Attend()
    q = torch.randn(3, 7, 32) if batched else torch.randn(7, 32)
    kv = (torch.randn(3, 5, 32) if batched else torch.randn(5, 32)) if cross else q
    b, s = (3 if batched else 1), (5 if cross else 7)
    expected = _mha_formula(b, 7, s, 32)
    assert dcopt.count_macs(m.eval(), (q, kv)) == expected          # fused fast path (eval, no grad)
    assert dcopt.count_macs(m.train(), (q, kv)) == expected         # in_proj / sdpa / out_proj path


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("norm_first, activation", [(False, "relu"), (True, "gelu")])
def test_fused_encoder_layer_counts_what_the_slow_path_does(batched, norm_first, activation):
    """In eval without grad a batch_first TransformerEncoderLayer runs as one fused kernel
    (aten._transformer_encoder_layer_fwd) that torch's counter gives 0: a speech encoder's
    whole attention stack vanished from the totals, and with it every MACs fraction."""
    torch.manual_seed(0)
    m = nn.TransformerEncoderLayer(32, 4, 48, batch_first=True, norm_first=norm_first, activation=activation)
    x = torch.randn(3, 7, 32) if batched else torch.randn(7, 32)
    b = 3 if batched else 1
    expected = _mha_formula(b, 7, 7, 32) + 2 * b * 7 * 32 * 48
    assert dcopt.count_macs(m.eval(), (x,)) == expected              # fused fast path
    assert dcopt.count_macs(m.train(), (x,)) == expected             # module by module
    assert dcopt.analyze(nn.Sequential(m).eval(), (x,)).macs == expected   # as an opaque leaf


def test_sdpa_on_cpu_is_counted():
    q, k, v = torch.randn(2, 4, 9, 8), torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 5)
    with dcopt.counting.flop_counter() as fc:
        F.scaled_dot_product_attention(q, k, v)
    assert fc.get_total_flops() == 2 * (2 * 4 * 9 * 6 * 8 + 2 * 4 * 9 * 6 * 5)


def test_vit_b_16_macs_match_the_published_count():
    """ViT-B/16 at 224²: 17.56 GMACs (torchvision's model card), attention included; the
    analysis used to miss every encoder block's attention (fused fast path)."""
    a = dcopt.analyze(torchvision.models.vit_b_16(), (torch.randn(1, 3, 224, 224),))
    assert abs(a.macs / 1e9 - 17.56) < 0.01
    assert 0.5 < a.dynamic_fraction < 0.67      # the MLP blocks (not the attention) are dynamic


def test_small_vit_predicted_equals_counted_at_random_sizes():
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                               hidden_dim=32, mlp_dim=64, num_classes=10)
    x = (torch.randn(2, 3, 32, 32),)
    dm = dcopt.convert(vit, x, kappa_min=1e-3)  # floor 1: every size down to 1 can be set
    assert dm.plan.groups
    rng = random.Random(0)
    for _ in range(3):
        assert_exact_export(dm, x, {g.name: rng.randint(1, g.width) for g in dm.plan.groups})


# -- the fast path of shape propagation counts what counting every node does (issue 7) --

def _fast_and_full(model, inputs):
    from dcopt.trace import propagate_shapes, trace

    gm = trace(model, inputs, allow_hooks=True).gm
    return propagate_shapes(gm, inputs), propagate_shapes(gm, inputs, count_all=True)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5", "squeezenet1_0",
                                  "efficientnet_b0", "convnext_tiny", "densenet121", "googlenet"])
def test_fast_counting_equals_counting_every_node_torchvision(name, one_thread):
    torch.manual_seed(0)
    kwargs = dict(aux_logits=False, init_weights=False) if name == "googlenet" else {}
    model = getattr(torchvision.models, name)(weights=None, **kwargs).eval()
    fast, full = _fast_and_full(model, (torch.randn(1, 3, 32, 32),))
    assert fast == full and sum(full.values()) > 0


def test_fast_counting_equals_counting_every_node_test_models():
    from models import CASES, build

    for name in CASES:
        fast, full = _fast_and_full(*build(name))
        assert fast == full, name


class _Odd(nn.Module):
    """Calls the fast path must not take on trust: a conv with a hook that multiplies
    matrices, a conv with a padding mode, a subclassed BatchNorm whose forward does a
    matmul, an unbatched conv, a Conv2d called with a keyword."""

    class MatmulBN(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) @ torch.ones(x.shape[-1], x.shape[-1])

    def __init__(self):
        super().__init__()
        self.hooked = nn.Conv2d(3, 4, 3, padding=1)
        self.hooked.register_forward_hook(lambda m, i, o: o @ torch.ones(o.shape[-1], o.shape[-1]))
        self.reflect = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
        self.same = nn.Conv2d(4, 4, 4, padding="same")
        self.bn = self.MatmulBN(4)
        self.plain_bn = nn.BatchNorm2d(4)
        self.single = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        x = self.plain_bn(self.bn(self.same(self.reflect(self.hooked(x)))))
        return self.single(x[0]).sum() + self.single(input=x).sum()


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_fast_counting_is_not_fooled_by_hooks_subclasses_and_odd_calls():
    x = (torch.randn(2, 3, 8, 8),)
    fast, full = _fast_and_full(_Odd().eval(), x)
    assert fast == full
    assert fast["hooked"] == 2 * 4 * 64 * 27 + 2 * 4 * 8 * 8 * 8   # conv + the hook's matmul
    assert fast["bn"] == 2 * 4 * 8 * 8 * 8                           # the subclass's matmul


@pytest.mark.parametrize("module, shape", [
    (nn.BatchNorm2d(4), (2, 4, 5, 5)), (nn.BatchNorm1d(4), (2, 4, 5)), (nn.LayerNorm(5), (2, 4, 5)),
    (nn.GroupNorm(2, 4), (2, 4, 5, 5)), (nn.AdaptiveAvgPool2d(1), (2, 4, 5, 5)), (nn.MaxPool2d(2), (2, 4, 6, 6)),
    (nn.AvgPool1d(2), (2, 4, 6)), (nn.Flatten(), (2, 4, 5)), (nn.Identity(), (2, 4)), (nn.Dropout(), (2, 4)),
])
def test_listed_zero_flop_modules_count_nothing(module, shape):
    """Every module type the fast path trusts counts 0 under torch's own counter (the list
    is checked again at run time, this keeps it honest between torch upgrades)."""
    from dcopt.counting import ZERO_FLOP_MODULES

    assert type(module) in ZERO_FLOP_MODULES
    with dcopt.counting.flop_counter() as fc, torch.no_grad():
        module.eval()(torch.randn(*shape))
    assert fc.get_total_flops() == 0


def test_every_listed_op_counts_nothing():
    from dcopt.counting import ZERO_FLOP_FUNCTIONS, ZERO_FLOP_METHODS, ZERO_FLOP_MODULES

    x = torch.randn(2, 4, 6, 6)
    ran = 0
    with dcopt.counting.flop_counter() as fc, torch.no_grad():
        for kind in ZERO_FLOP_MODULES:
            try:
                m = kind().eval()
            except TypeError:
                continue  # needs arguments: norms, pools (checked above)
            m(x[0] if kind is nn.Dropout1d else x)
            ran += 1
        for f in ZERO_FLOP_FUNCTIONS:
            if f is getattr:
                continue
            binary = f in (torch.add, torch.mul, torch.cat, torch.flatten) or f.__module__ == "_operator"
            if f is torch.cat:
                f([x, x], 1)
            elif f in (F.adaptive_avg_pool2d, F.avg_pool2d, F.max_pool2d):
                f(x, 2)
            elif f is operator.neg:
                f(x)
            else:
                f(x, 1) if binary else f(x)
            ran += 1
        for name in ZERO_FLOP_METHODS:
            args = {"view": (-1,), "reshape": (-1,), "permute": (1, 0, 2, 3), "transpose": (0, 1),
                    "expand": (2, 4, 6, 6), "chunk": (2,), "split": (2,), "add": (x,), "mul": (x,),
                    "unsqueeze": (0,)}.get(name, ())
            getattr(x, name)(*args)
            ran += 1
    assert fc.get_total_flops() == 0
    assert ran >= len(ZERO_FLOP_FUNCTIONS) + len(ZERO_FLOP_METHODS) + 10


def test_propagated_metadata_matches_fx_shape_prop():
    """dcopt's propagation stores what fx's ShapeProp stores (but the memory format) on
    every node, also for tuple outputs (RNNs) and non-tensor values."""
    from torch.fx.passes.shape_prop import ShapeProp
    from models import CASES, build
    from dcopt.trace import propagate_shapes, trace

    def strip(meta):
        if hasattr(meta, "shape") and hasattr(meta, "memory_format"):
            return meta._replace(memory_format=None)
        return type(meta)(strip(m) for m in meta) if isinstance(meta, (tuple, list)) else meta

    for name in CASES:
        model, inputs = build(name)
        gm = trace(model, inputs).gm
        with torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
        theirs = {n.name: (strip(n.meta.get("tensor_meta")), n.meta.get("type")) for n in gm.graph.nodes}
        for n in gm.graph.nodes:
            n.meta.pop("tensor_meta", None)
            n.meta.pop("type", None)
        propagate_shapes(gm, inputs)
        assert {n.name: (n.meta.get("tensor_meta"), n.meta.get("type")) for n in gm.graph.nodes} == theirs, name


class _PackedLSTM(nn.Module):
    def __init__(self, batch_first):
        super().__init__()
        self.batch_first = batch_first
        self.lstm, self.out = nn.LSTM(8, 16, batch_first=batch_first, bidirectional=True), nn.Linear(32, 2)

    def forward(self, x, lengths):
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=self.batch_first, enforce_sorted=False)
        y, _ = self.lstm(packed)
        return self.out(nn.utils.rnn.pad_packed_sequence(y, batch_first=self.batch_first)[0])


@pytest.mark.parametrize("batch_first", [True, False])
def test_an_lstm_on_a_packed_sequence_counts_its_real_steps(batch_first):
    """count_macs read .dim() of the PackedSequence (AttributeError)."""
    x = torch.randn(3, 5, 8) if batch_first else torch.randn(5, 3, 8)
    lengths = torch.tensor([5, 3, 2])
    lstm = 2 * 4 * 16 * (8 + 16) * int(lengths.sum())          # two directions, real steps only
    assert dcopt.count_macs(_PackedLSTM(batch_first), (x, lengths)) == lstm + 3 * 5 * 32 * 2


class LearnedQueryPool(nn.Module):
    """Attention pooling with a learned query (speaker/keyword embedding heads), and a
    learned positional table sliced and projected: views of parameters passed straight
    into submodules, which torch's FLOP counter asserted on under no_grad."""

    def __init__(self, d=16):
        super().__init__()
        self.inp = nn.Linear(8, d)
        self.pos = nn.Parameter(torch.randn(32, d))
        self.pos_proj = nn.Linear(d, d)
        self.ff = nn.Linear(d, 24)
        self.ff2 = nn.Linear(24, d)
        self.query = nn.Parameter(torch.randn(1, 1, d))
        self.pool = nn.MultiheadAttention(d, 2, batch_first=True)
        self.out = nn.Linear(d, 3)

    def forward(self, x):
        h = self.inp(x) + self.pos_proj(self.pos[: x.size(1)])
        h = h + self.ff2(torch.relu(self.ff(h)))
        return self.out(self.pool(self.query.expand(x.size(0), -1, -1), h, h, need_weights=False)[0][:, 0])


def test_views_of_parameters_into_submodules_are_counted():
    torch.manual_seed(0)
    model = LearnedQueryPool()
    x = (torch.randn(2, 10, 8),)
    dm = dcopt.convert(model, x)
    assert dm.group_names == ["ff"]
    dm.set_sizes({"ff": 9})
    small = dcopt.export(dm)
    assert dcopt.count_macs(small, x) == round(dm.complexity("kept").macs.item())
    assert dcopt.count_macs(model, x) > 0
    assert all(p.requires_grad for p in model.parameters())   # switched off for the count only
