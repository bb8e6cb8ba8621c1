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
