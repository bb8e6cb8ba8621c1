"""Rules for ``torch.nn`` layers: producers (DCL), consumers (ACL) and per-channel layers."""
from __future__ import annotations

import torch
from torch import nn

from ..fmap import FMap, Positions
from .common import norm_dim, normalizes_features_alone, normalizes_last, passthrough
from .registry import register_rule

__all__ = ["writes_own_weights"]

_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign, nn.Tanhshrink,
    nn.Threshold, nn.LogSigmoid, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Hardshrink, nn.Softshrink,
)
register_rule(*_ACTIVATIONS, rule=passthrough)


def _channel_dim(ctx, spatial: int) -> int:
    """Channel dim of a conv/norm input: 1 when batched, 0 when not."""
    nd = len(ctx.shape(ctx.arg(0, "input")))
    return nd - spatial - 1


@register_rule(nn.Linear)
def linear(ctx):
    """Linear: consumes its input's last dim, produces a new group on its output's last dim."""
    x = ctx.arg(0, "input")
    fm = ctx.fmap(x)
    nd = len(ctx.shape(x))
    m = ctx.module
    if fm is not None and fm.dim != nd - 1:
        # Maps the last dim at every position of the tracked dim: features stay apart.
        ctx.consumes(fm)
        ctx.macs(["weight"], extra=[fm.pos])
        return fm
    out = Positions.group(ctx.new_group(m.out_features), m.out_features)
    in_pos = fm.pos if fm is not None else None
    ctx.gate(x)
    ctx.plan_param("weight", (out, in_pos))
    if m.bias is not None:
        ctx.plan_param("bias", (out,))
    ctx.plan_attr("out_features", out)
    if in_pos is not None:
        ctx.plan_attr("in_features", in_pos)
    ctx.macs(["weight"])
    return FMap(len(ctx.out_shape) - 1, out)


@register_rule(nn.Bilinear)
def _bilinear(ctx):
    from .common import reject_tracked
    reject_tracked(ctx, "Bilinear mixes two inputs; no rule yet")
    return None


def _conv(ctx, transposed: bool):
    x = ctx.arg(0, "input")
    m = ctx.module
    fm = ctx.fmap(x)
    spatial = len(m.kernel_size)
    cdim = _channel_dim(ctx, spatial)
    if fm is not None and fm.dim != cdim:
        ctx.reject(fm, f"{type(m).__name__} mixes its spatial dims, and the features run along dim {fm.dim}")
        return None
    if m.groups == 1:
        out = Positions.group(ctx.new_group(m.out_channels), m.out_channels)
        in_pos = fm.pos if fm is not None else None
        ctx.gate(x)
        rest = (None,) * spatial
        ctx.plan_param("weight", ((in_pos, out) if transposed else (out, in_pos)) + rest)
        if m.bias is not None:
            ctx.plan_param("bias", (out,))
        ctx.plan_attr("out_channels", out)
        if in_pos is not None:
            ctx.plan_attr("in_channels", in_pos)
        ctx.macs(["weight"])
        return FMap(cdim, out)
    if fm is None:
        return None
    if m.groups == m.in_channels:
        # depthwise: output channel o reads input channel o // multiplier only. The weight
        # is (out, 1, k...) for a conv and (in, multiplier, k...) for a transposed one.
        mult = m.out_channels // m.in_channels
        out = fm.pos.tile(1, mult)
        ctx.consumes(fm)
        ctx.plan_param("weight", ((fm.pos,) if transposed else (out,)) + (None,) * (spatial + 1))
        if m.bias is not None:
            ctx.plan_param("bias", (out,))
        ctx.plan_attr("in_channels", fm.pos)
        ctx.plan_attr("groups", fm.pos)
        ctx.plan_attr("out_channels", out)
        ctx.macs(["weight"])
        return FMap(cdim, out)
    ctx.reject(fm, f"grouped {type(m).__name__} (groups={m.groups}) ties channels in blocks of "
                   f"{m.in_channels // m.groups} (and {m.out_channels // m.groups} out); removing single "
                   "channels would break the blocks")
    return None


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv(ctx):
    return _conv(ctx, transposed=False)


@register_rule(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def conv_transpose(ctx):
    return _conv(ctx, transposed=True)


def _per_channel(ctx, spatial_any: bool, params=("weight", "bias"), buffers=(), attrs=("num_features",),
                 cdim=None):
    """A layer with one parameter (and statistic) per channel. ``cdim``: the channel dim
    of this call's input; by default 1, or 0 for a 1-D input (BatchNorm1d's (N, C),
    PReLU's (C,)) — a layer that also takes unbatched inputs passes its own."""
    x = ctx.arg(0, "input")
    fm = ctx.fmap(x)
    if fm is None:
        return None
    nd = len(ctx.shape(x))
    m = ctx.module
    if cdim is None:
        cdim = 1 if nd > 1 else 0
    if fm.dim != cdim:
        ctx.reject(fm, f"{type(m).__name__} normalizes over dim {fm.dim}, where the features run")
        return None
    ctx.consumes(fm)
    for name in params + buffers:
        if getattr(m, name, None) is not None:
            ctx.plan_param(name, (fm.pos,))
    for attr in attrs:
        ctx.plan_attr(attr, fm.pos)
    return fm


@register_rule(nn.modules.batchnorm._BatchNorm)
def batchnorm(ctx):
    """BatchNorm keeps one set of statistics per channel: slice them with the channel."""
    x = ctx.arg(0, "input")
    fm = ctx.fmap(x)
    if fm is not None and len(ctx.shape(x)) == 1:
        ctx.reject(fm, "unbatched BatchNorm input")
        return None
    return _per_channel(ctx, True, buffers=("running_mean", "running_var"))


@register_rule(nn.modules.instancenorm._InstanceNorm)
def instancenorm(ctx):
    """InstanceNormNd takes (N, C, *spatial) or unbatched (C, *spatial): the channel dim
    is counted from the end (an unbatched InstanceNorm1d's (C, L) has C on dim 0 and
    normalizes over dim 1)."""
    spatial = ctx.module._get_no_batch_dim() - 1
    return _per_channel(ctx, True, buffers=("running_mean", "running_var"), cdim=_channel_dim(ctx, spatial))


@register_rule(nn.GroupNorm)
def groupnorm(ctx):
    """Exact only when every group is one channel (then it is per-channel)."""
    fm = ctx.fmap(ctx.arg(0, "input"))
    m = ctx.module
    if fm is None:
        return None
    if m.num_groups != m.num_channels:
        ctx.reject(fm, f"GroupNorm with {m.num_groups} groups of {m.num_channels // m.num_groups} channels "
                       "computes statistics across features; removing one changes the others")
        return None
    return _per_channel(ctx, True, attrs=("num_groups", "num_channels"))


@register_rule(nn.LayerNorm, nn.RMSNorm)
def layernorm(ctx):
    """A norm over the last dim alone, where the features run: learned, with statistics
    over the kept features only in the gated model (:class:`~dcopt.gates.MaskedNorm`), so
    the export is the same norm over fewer features (``normalized_shape`` and the affine
    parameters sliced). Features on a dim it does not normalise pass through; features
    inside a multi-dim ``normalized_shape`` keep their width."""
    m = ctx.module
    x = ctx.arg(0, "input")
    fm = ctx.fmap(x)
    if not normalizes_features_alone(ctx, x, fm, len(m.normalized_shape)):
        return normalizes_last(ctx, len(m.normalized_shape), type(m).__name__)
    ctx.gate(x)
    if not ctx.masked_norm(fm.pos):
        return None
    for name in ("weight", "bias"):
        if getattr(m, name, None) is not None:
            ctx.plan_param(name, (fm.pos,))
    ctx.plan_attr("normalized_shape", fm.pos, kind="shape")
    ctx.consumes(fm)
    return FMap(fm.dim, fm.pos)


@register_rule(nn.PReLU)
def prelu(ctx):
    if ctx.module.num_parameters == 1:
        return passthrough(ctx)
    return _per_channel(ctx, True, params=("weight",), attrs=("num_parameters",))


def writes_own_weights(module: nn.Module) -> bool:
    """Modules whose forward writes their own weight in place: Embedding/EmbeddingBag
    with ``max_norm`` renormalise the rows they look up (``analyze`` traces a copy)."""
    return isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.max_norm is not None


@register_rule(nn.Embedding)
def embedding(ctx):
    """Embedding: indices in, a new group of ``embedding_dim`` features out."""
    m = ctx.module
    out = Positions.group(ctx.new_group(m.embedding_dim), m.embedding_dim)
    if m.max_norm is not None:
        # each looked-up row is rescaled by its norm over embedding_dim: the kept features'
        # values depend on the removed ones (and the forward writes the weight in place)
        ctx.reject(out, f"Embedding with max_norm={m.max_norm} renormalizes each row by its norm over "
                        "embedding_dim (the features): removing features changes the kept ones")
        return FMap(len(ctx.out_shape) - 1, out)
    ctx.plan_param("weight", (None, out))
    ctx.plan_attr("embedding_dim", out)
    return FMap(len(ctx.out_shape) - 1, out)


_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


@register_rule(nn.RNN, nn.GRU, nn.LSTM)
def rnn(ctx):
    """GRU/LSTM/RNN: consumes ``input_size`` features, produces ``hidden_size`` units.

    The hidden units are a group shared by every layer and direction; each weight's
    rows hold one block of H per gate, so the group appears G times along them.
    """
    m = ctx.module
    x = ctx.arg(0, "input")
    fm = ctx.fmap(x)
    nd = len(ctx.shape(x))
    if fm is not None and fm.dim != nd - 1:
        ctx.reject(fm, f"{type(m).__name__} mixes time steps, and the features run along dim {fm.dim}")
        fm = None
    if getattr(m, "proj_size", 0):
        return _projected_lstm(ctx, x, fm)
    G = _GATES[m.mode]
    D = 2 if m.bidirectional else 1
    H = m.hidden_size
    hpos = Positions.group(ctx.new_group(H), H)
    rows = Positions.cat([hpos] * G)
    in_pos = fm.pos if fm is not None else None
    ctx.gate(x)
    weights = []
    for layer in range(m.num_layers):
        for sfx in ([""] + (["_reverse"] if m.bidirectional else [])):
            cols = in_pos if layer == 0 else Positions.cat([hpos] * D)
            ctx.plan_param(f"weight_ih_l{layer}{sfx}", (rows, cols))
            ctx.plan_param(f"weight_hh_l{layer}{sfx}", (rows, hpos))
            weights += [f"weight_ih_l{layer}{sfx}", f"weight_hh_l{layer}{sfx}"]
            if m.bias:
                ctx.plan_param(f"bias_ih_l{layer}{sfx}", (rows,))
                ctx.plan_param(f"bias_hh_l{layer}{sfx}", (rows,))
    ctx.plan_attr("hidden_size", hpos)
    if in_pos is not None:
        ctx.plan_attr("input_size", in_pos)
    ctx.rnn_hidden(hpos)
    ctx.macs(weights, coef=_rnn_steps(ctx, x))  # per step and direction: G*H*(I+H)
    h0 = ctx.arg(1, "hx")
    if h0 is not None:
        # ``(h0, c0)`` written in the call is a tuple of nodes; an encoder's whole state
        # passed on (``_, state = enc(x); dec(y, state)``) is one node holding a tuple
        if isinstance(h0, (tuple, list)):
            states = [ctx.value(s) for s in h0]
        else:
            value = ctx.value(h0)
            states = list(value) if isinstance(value, (tuple, list)) else [value]
        nodes = list(h0) if isinstance(h0, (tuple, list)) else [h0] * len(states)
        for sfm, node in zip(states, nodes):
            if _learned_state(ctx, sfm, node, H, hpos):
                continue
            sfm = sfm if isinstance(sfm, FMap) else None
            ctx.unify([hpos, sfm.pos if sfm is not None else Positions.fixed(H)], " (initial hidden state)")
    out = FMap(nd - 1, Positions.cat([hpos] * D))
    hn = FMap(1 if nd == 2 else 2, hpos)
    if m.mode == "LSTM":
        return (out, (hn, hn))
    return (out, hn)


def _learned_state(ctx, value, node, H: int, hpos: Positions) -> bool:
    """A learned initial state: a parameter holding the units whole along its last dim,
    expanded to the batch (``self.h0.expand(-1, B, -1)``). Sliced with the hidden units:
    a removed unit starts from its own value but, its rows and columns masked inside the
    recurrence, never reaches a kept one, and its outputs are gated."""
    from ..analysis import ParamRef

    shape = ctx.shape(node) if isinstance(node, torch.fx.Node) else None
    if not isinstance(value, ParamRef) or shape is None or shape[-1] != H or len(shape) - 1 in value.sliced:
        return False
    ctx.plan_param(value.target, (None,) * (len(shape) - 1) + (hpos,), absolute=True)
    return True


def _rnn_steps(ctx, x) -> float:
    """Rows the recurrence runs: time steps × batch."""
    shape = ctx.shape(x)
    if len(shape) == 2:
        return float(shape[0])
    return float(shape[1] * shape[0])


def _projected_lstm(ctx, x, fm):
    """An LSTM with ``proj_size``: its input features are read by ``weight_ih_l0`` alone,
    as a Linear reads them, so they are sliced there (gated in front) and the group that
    feeds the LSTM is learned. The LSTM's own widths stay: its hidden units sit between
    the cell and the projection, where no gate can put the size noise, and the
    projection's output is what the recurrence reads back. MACs: per step, direction and
    layer 4·H·(I+P) + P·H, the numel of its weights."""
    m = ctx.module
    weights = [n for n, _ in m.named_parameters() if n.startswith("weight")]
    if fm is not None:
        ctx.gate(x)
        for sfx in ([""] + (["_reverse"] if m.bidirectional else [])):
            ctx.plan_param(f"weight_ih_l0{sfx}", (None, fm.pos))
        ctx.plan_attr("input_size", fm.pos)
    ctx.macs(weights, coef=_rnn_steps(ctx, x))
    return None


def _pool(spatial: int):
    def rule(ctx):
        x = ctx.arg(0, "input")
        fm = ctx.fmap(x)
        if fm is None:
            return None
        nd = len(ctx.shape(x))
        if getattr(ctx.module, "return_indices", False):
            ctx.reject(fm, "pooling with return_indices: no rule yet")
            return None
        if fm.dim >= nd - spatial:
            ctx.reject(fm, f"{type(ctx.module).__name__} pools over dim {fm.dim}, where the features run")
            return None
        ctx.consumes(fm)
        return FMap(fm.dim, fm.pos)
    return rule


for _k, _types in {1: (nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.LPPool1d,
                       nn.ReflectionPad1d, nn.ReplicationPad1d, nn.ZeroPad1d, nn.ConstantPad1d, nn.CircularPad1d),
                   2: (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d,
                       nn.ReflectionPad2d, nn.ReplicationPad2d, nn.ZeroPad2d, nn.ConstantPad2d, nn.CircularPad2d,
                       nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d),
                   3: (nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d,
                       nn.ReflectionPad3d, nn.ReplicationPad3d, nn.ConstantPad3d, nn.CircularPad3d)}.items():
    register_rule(*_types, rule=_pool(_k))


@register_rule(nn.Upsample)
def upsample(ctx):
    x = ctx.arg(0, "input")
    nd = len(ctx.shape(x))
    return _pool(nd - 2)(ctx)


@register_rule(nn.Softmax, nn.LogSoftmax, nn.Softmin)
def softmax_module(ctx):
    fm = ctx.fmap(ctx.arg(0, "input"))
    if fm is None:
        return None
    nd = len(ctx.shape(ctx.arg(0, "input")))
    dim = ctx.module.dim
    if dim is None or norm_dim(dim, nd) == fm.dim:
        ctx.reject(fm, f"{type(ctx.module).__name__} normalizes over the feature dimension")
        return None
    ctx.consumes(fm)
    return fm



# torchvision's stochastic depth: a per-sample (row) or per-batch scalar, never per channel
from .registry import REGISTRY as _REGISTRY  # noqa: E402

_REGISTRY.modules_by_name["torchvision.ops.stochastic_depth.StochasticDepth"] = passthrough
