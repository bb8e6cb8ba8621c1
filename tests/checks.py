"""The one check every rewrite answers to: the exported model computes what the eval-mode
gated model computes, and costs (MACs counted on it, parameters) what ``complexity()``
predicted. Shared by the export, opaque-leaf, rounding and counting tests."""
import torch

import dcopt
from dcopt.numcheck import max_relative_error


def assert_exact_export(dm, inputs, sizes=None, *, others=(), tol=1e-5):
    """Set ``sizes`` (if given), export with the library's own check on (an ExportError
    fails the test), and assert equality on ``inputs`` and each tuple in ``others`` (a
    different batch) plus MACs and parameters exact. Returns the exported model."""
    if sizes is not None:
        dm.set_sizes(sizes)
    small = dcopt.export(dm)
    dm.eval()
    small.eval()
    with torch.no_grad():
        for xs in (inputs, *others):
            err = max_relative_error(dm(*xs), small(*xs))
            assert err <= tol, f"{sizes}: relative error {err}"
    kept = dm.complexity("kept")
    assert dcopt.count_macs(small, inputs) == round(kept.macs.item()), sizes
    assert sum(p.numel() for p in small.parameters()) == round(kept.params.item()), sizes
    return small


def converted_exactly(model, inputs, others=(), kappa_min=0.01):
    """Convert ``model`` (seeded), check that the gated model at full width computes what
    ``model`` does on ``inputs`` and each of ``others``, then export at every group of size
    1, of size 3, at two mixes that keep groups at different sizes (a MACs formula wrong
    for one group can pass when all share a size), and at full width, each checked by
    :func:`assert_exact_export`. Returns the DynamicModel."""
    torch.manual_seed(0)
    dm = dcopt.convert(model, inputs, kappa_min=kappa_min)
    model.eval()
    with torch.no_grad():
        for xs in (inputs, *others):
            assert max_relative_error(model(*xs), dm.eval()(*xs)) <= 1e-6
    names = dm.group_names
    widths = [g.width for g in dm.plan.groups]
    mixed = {n: (1 if i % 2 else w) for i, (n, w) in enumerate(zip(names, widths))}
    mixed2 = {n: (w if i % 2 else max(1, w // 3)) for i, (n, w) in enumerate(zip(names, widths))}
    for sizes in ({n: 1 for n in names}, {n: 3 for n in names}, mixed, mixed2, dict(zip(names, widths))):
        assert_exact_export(dm, inputs, sizes, others=others)
    return dm


def assert_head_widths_learned(dm, heads: int, d_head: int):
    """``q[0:d]`` (q and k coupled) and ``v[0:d]`` are head-width groups; at sizes 2 and 3
    every projection of the export has ``heads`` heads of that width."""
    widths = {g.name: g.width for g in dm.plan.groups}
    assert widths["q[0:4]"] == d_head and widths["v[0:4]"] == d_head   # q and k coupled; v its own
    dm.set_sizes({"q[0:4]": 2, "v[0:4]": 3})
    small = dcopt.export(dm)
    assert small.q.out_features == heads * 2 and small.k.out_features == heads * 2
    assert small.v.out_features == heads * 3 and small.o.in_features == heads * 3
