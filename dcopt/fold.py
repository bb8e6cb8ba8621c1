"""Fold eval-mode BatchNorm into the convolution (plain or transposed) or Linear before it.

Why: after export the convolutions shrink with the MACs, but the memory-bound ops around
them shrink only with the width, so latency falls more slowly than the MACs
(benchmarks/results/speed.md, 2b). A BatchNorm right after a convolution is one such
op, and in inference it is an affine map per channel that the convolution can absorb:
w' = w·γ/√(var+ε), b' = (b − μ)·γ/√(var+ε) + β. ``dcopt.export(dm, fold_batchnorm=True)``
does that to the exported model, for deployment; the folded model has no BatchNorm left
to fine-tune, so it is an option, off by default.

The arithmetic is torch's (``torch.nn.utils.fusion``); what this module adds to
``torch.fx.experimental.optimization.fuse`` are the checks that make the fold exact
rather than usually right:

* the layer's output feeds only the BatchNorm (fx's ``fuse`` checks this too);
* neither module is called at another place in the graph, nor are its parameters read
  directly (``self.conv.weight`` in a forward); ``fuse`` checks neither: folding would
  change what that other use computes;
* the channel dim the BatchNorm normalises (dim 1) is the layer's feature dim: a
  batched convolution (output rank = spatial dims + 2) or a Linear with 2-D output.
  A Linear applied to (N, L, C) followed by BatchNorm1d normalises L, not C, and
  ``fuse`` would fold it whenever L happens to equal C; an unbatched Conv1d likewise;
* the BatchNorm tracks running statistics (otherwise eval mode uses batch statistics,
  which no weight can absorb);
* a transposed convolution has ``groups == 1``: its weight is (in, out / groups, …), and
  torch's arithmetic scales dim 1 as if it held all the output channels.

Pairs that fail a check stay as they are. ``export`` then compares the folded model with
the eval-mode DynamicModel by numbers, like every other export.
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

__all__ = ["fold_batchnorm"]

#: (layer type, BatchNorm type, rank of a batched output): exact types, as fx's fuse uses
_PAIRS = (
    (nn.Conv1d, nn.BatchNorm1d, 3),
    (nn.Conv2d, nn.BatchNorm2d, 4),
    (nn.Conv3d, nn.BatchNorm3d, 5),
    (nn.ConvTranspose1d, nn.BatchNorm1d, 3),
    (nn.ConvTranspose2d, nn.BatchNorm2d, 4),
    (nn.ConvTranspose3d, nn.BatchNorm3d, 5),
    (nn.Linear, nn.BatchNorm1d, 2),
)


def _candidates(gm: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, torch.fx.Node, int]]:
    """(layer node, BatchNorm node, expected output rank) for every structurally foldable pair."""
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    for n in gm.graph.nodes:        # a parameter or buffer read directly counts as a use of its module
        if n.op == "get_attr":
            parts = str(n.target).split(".")
            for i in range(1, len(parts)):
                calls[".".join(parts[:i])] += 1
    modules = dict(gm.named_modules())
    found = []
    for bn_node in gm.graph.nodes:
        if bn_node.op != "call_module" or len(bn_node.args) != 1 or bn_node.kwargs:
            continue
        layer_node = bn_node.args[0]
        if not isinstance(layer_node, torch.fx.Node) or layer_node.op != "call_module":
            continue
        layer, bn = modules[layer_node.target], modules[bn_node.target]
        for layer_type, bn_type, rank in _PAIRS:
            if type(layer) is layer_type and type(bn) is bn_type:
                transposed_groups = isinstance(layer, nn.modules.conv._ConvTransposeNd) and layer.groups != 1
                if len(layer_node.users) == 1 and calls[layer_node.target] == 1 and calls[bn_node.target] == 1 \
                        and bn.track_running_stats and bn.running_mean is not None and not transposed_groups:
                    found.append((layer_node, bn_node, rank))
                break
    return found


def _output_ranks(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node], example_inputs: tuple) -> dict[str, int]:
    """The rank of each layer's output on the example inputs (forward hooks: each layer is
    called once, checked by :func:`_candidates`)."""
    ranks: dict[str, int] = {}
    handles = []
    for node in nodes:
        def hook(_mod, _inp, out, name=node.target):
            ranks[name] = out.dim() if isinstance(out, torch.Tensor) else -1
        handles.append(gm.get_submodule(node.target).register_forward_hook(hook))
    try:
        with torch.no_grad():
            gm(*example_inputs)
    finally:
        for h in handles:
            h.remove()
    return ranks


def fold_batchnorm(gm: torch.fx.GraphModule, example_inputs: tuple) -> list[tuple[str, str]]:
    """Fold every BatchNorm that can be folded exactly into the layer before it, in place
    (module docstring for the conditions). ``gm`` must be in eval mode: the fold uses the
    running statistics. Returns the (layer, BatchNorm) module names folded."""
    if gm.training:
        raise ValueError("fold_batchnorm folds running statistics: put the model in eval mode first")
    folded: list[tuple[str, str]] = []
    while True:   # conv → BN → BN: once the first is folded the second follows the conv
        pairs = _candidates(gm)
        ranks = _output_ranks(gm, [layer for layer, _, _ in pairs], example_inputs)
        before = len(folded)
        for layer_node, bn_node, rank in pairs:
            if ranks.get(layer_node.target) == rank:
                _fold_pair(gm, layer_node, bn_node)
                folded.append((layer_node.target, bn_node.target))
        if len(folded) == before:
            break
        gm.recompile()
    if folded:
        gm.delete_all_unused_submodules()
        gm.recompile()
    return folded


def _fold_pair(gm: torch.fx.GraphModule, layer_node: torch.fx.Node, bn_node: torch.fx.Node) -> None:
    """Replace the layer by its fold with the BatchNorm and take the BatchNorm out of the graph."""
    layer, bn = gm.get_submodule(layer_node.target), gm.get_submodule(bn_node.target)
    if isinstance(layer, nn.Linear):
        fused = fuse_linear_bn_eval(layer, bn)
    else:
        fused = fuse_conv_bn_eval(layer, bn, transpose=isinstance(layer, nn.modules.conv._ConvTransposeNd))
    parent, _, attr = layer_node.target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, attr, fused)
    bn_node.replace_all_uses_with(layer_node)
    gm.graph.erase_node(bn_node)
