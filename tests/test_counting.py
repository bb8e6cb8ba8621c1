"""MAC counting sees the fused CPU attention kernels torch's FlopCounterMode misses."""
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
    dm = dcopt.convert(vit, x)
    assert dm.plan.groups
    rng = random.Random(0)
    for _ in range(3):
        assert_exact_export(dm, x, {g.name: rng.randint(1, g.width) for g in dm.plan.groups})
