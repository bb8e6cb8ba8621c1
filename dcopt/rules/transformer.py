"""torch's transformer encoder layers when they stay whole.

dcopt normally traces through ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder``
(``dcopt/traceable.py``), so their feed-forward widths are ordinary groups. These rules
only say why a group keeps its width when such a module stays a leaf (the user named
it in ``leaf_modules``, an encoder layer's activation is not the one torch's fused path
applies, or this torch lacks the helpers the traced forwards call), and read the one helper of torch's the traced encoder calls on a
feature tensor (``_get_seq_len``).
"""
from __future__ import annotations

from torch import nn
from torch.nn.modules import transformer as _tx

from ..traceable import kept_whole_reason
from .common import reject_tracked, width_of
from .registry import register_rule

__all__ = ["multihead_attention", "kept_whole", "seq_len"]


@register_rule(nn.MultiheadAttention)
def multihead_attention(ctx):
    """The stream through attention keeps its width: ``embed_dim`` is at once the query's
    width, the heads' total width and the output's, so removing a feature of the input
    would remove one of a head's too."""
    reject_tracked(ctx, "nn.MultiheadAttention uses embed_dim as its input width, its heads' total width and its "
                        "output width at once: removing input features would change the heads; no rule yet")
    return None


@register_rule(nn.TransformerEncoderLayer, nn.TransformerEncoder)
def kept_whole(ctx):
    """Whatever reaches it keeps its width, and so does each feed-forward width inside:
    reported as a group of its own, so the reason shows even where the stream feeding
    the layer was fixed already."""
    reason = kept_whole_reason(ctx.module)
    reject_tracked(ctx, reason)
    inner = {"": ctx.module} if isinstance(ctx.module, nn.TransformerEncoderLayer) else \
        {f".layers.{i}": layer for i, layer in enumerate(ctx.module.layers)}
    for where, layer in inner.items():
        lin = getattr(layer, "linear1", None)
        if isinstance(lin, nn.Linear):
            ctx.reject(ctx.new_group(lin.out_features, f"{ctx.target}{where}.linear1"), reason)
    return None


def seq_len(ctx):
    """torch's ``_get_seq_len(src, batch_first)``: the size of the sequence dim (dim 0 of
    an unbatched input; 1 or 0 by ``batch_first``), read as a number like ``x.size(d)``."""
    src = ctx.arg(0, "src")
    nd = len(ctx.shape(src))
    dim = 0 if nd == 2 else (1 if ctx.arg(1, "batch_first") else 0)
    ctx.reads_only_metadata(src)
    return width_of(ctx, ctx.fmap(src), dim)


if hasattr(_tx, "_get_seq_len"):
    register_rule(_tx._get_seq_len, rule=seq_len)
