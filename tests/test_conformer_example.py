"""examples/conformer_speech.py: every width of a Conformer is learned — d_model through
its LayerNorms and residuals, the head width through SDPA, each feed-forward and each
convolution module (GLU halves coupled) — and exports exactly at mixed sizes."""
import random
import sys
from pathlib import Path

import torch

import dcopt

from checks import assert_exact_export

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from conformer_speech import Conformer, build_model, example_inputs  # noqa: E402


def test_the_example_is_all_dynamic():
    a = dcopt.analyze(build_model(), example_inputs())
    assert a.dynamic_fraction == 1.0
    names = {g.name for g in a.dynamic_groups}
    assert {"subsample", "blocks.0.attn.q[0:24]", "blocks.0.attn.v[0:24]", "blocks.0.conv.pw1[0:96]",
            "blocks.0.ff1.up", "blocks.1.ff2.up"} <= names
    assert [r.reason for r in a.rejections] == ["reaches the model output"]


def test_a_small_conformer_exports_exactly_at_mixed_sizes():
    torch.manual_seed(0)
    model = Conformer(d=24, heads=3, ffn=20, channels=10, blocks=2, classes=5)
    x = (torch.randn(2, 40, 30),)
    dm = dcopt.convert(model, x, kappa_min=0.05)
    model.eval()
    with torch.no_grad():
        assert (model(*x) - dm.eval()(*x)).abs().max() < 1e-5
    rng = random.Random(0)
    for _ in range(3):
        sizes = {g.name: rng.randint(1, g.width) for g in dm.plan.groups}
        small = assert_exact_export(dm, x, sizes, others=[(torch.randn(3, 40, 17),), (torch.randn(1, 40, 4),)])
        d = sizes["subsample"]
        assert small.get_submodule("blocks.0.norm").normalized_shape == (d,) and small.head.in_features == d
