"""One FLOP counter for everything dcopt counts: torch's ``FlopCounterMode`` plus the
formulas it lacks on CPU.

Why: "predicted MACs == counted MACs" is only worth something if the counter sees every
matmul. ``torch.utils.flop_counter`` (torch 2.14) has no formula for two fused CPU
kernels, so it silently counts 0 for them:

* ``aten._scaled_dot_product_flash_attention_for_cpu`` -- what
  ``F.scaled_dot_product_attention`` runs on CPU (its CUDA siblings are registered);
* ``aten._native_multi_head_attention`` -- the fused fast path ``nn.MultiheadAttention``
  takes in eval mode without grad (ViT's encoder blocks, for one): in-projection,
  attention and out-projection all disappear from the count;
* ``aten._transformer_encoder_layer_fwd`` -- the fused fast path of a whole
  ``nn.TransformerEncoderLayer(batch_first=True)`` in eval without grad: attention and
  feed-forward.

All three are added here through ``FlopCounterMode(custom_mapping=...)`` (the library's own
extension point), with the same conventions as torch's formulas (2 FLOPs per MAC, bias
additions not counted), so the fast path counts exactly what the slow path does. The
fused float32 LSTM kernel is handled separately, per module, in
:func:`dcopt.report.count_macs` and the analysis (it is one op per whole sequence).
"""
from __future__ import annotations

import contextlib
import operator
from typing import Callable, Hashable, Optional

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count, shape_wrapper

__all__ = ["flop_counter", "EXTRA_FLOP_FORMULAS", "zero_flop_key", "conv_flops", "parameters_without_grad"]

aten = torch.ops.aten


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """``(B, H, L, E) x (B, H, S, E) x (B, H, S, Ev)``: QKᵀ and attention·V."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _native_mha_flop(query_shape, key_shape, value_shape, embed_dim, num_head, qkv_weight_shape, *args,
                     out_shape=None, **kwargs) -> int:
    """Fused MHA on ``(B, L, E)`` (or unbatched ``(L, E)``) query and ``(B, S, E)`` key/value:
    the q, k and v in-projections, QKᵀ and attention·V over all heads, the out-projection."""
    def rows(shape):
        return (1, shape[0]) if len(shape) == 2 else (shape[0], shape[1])

    b, lq = rows(query_shape)
    _, s = rows(key_shape)
    e = int(embed_dim)
    in_proj = b * (lq + 2 * s) * e * e
    attention = 2 * b * lq * s * e          # QKᵀ (E split over heads) and attention·V
    out_proj = b * lq * e * e
    return 2 * (in_proj + attention + out_proj)


def _encoder_layer_flop(src_shape, embed_dim, num_heads, qkv_weight_shape, qkv_bias_shape, proj_weight_shape,
                        proj_bias_shape, use_gelu, norm_first, eps, norm_weight_1, norm_bias_1, norm_weight_2,
                        norm_bias_2, ffn_weight_1_shape, *args, out_shape=None, **kwargs) -> int:
    """The fused ``nn.TransformerEncoderLayer`` (eval, no grad, ``batch_first``): its
    self-attention as :func:`_native_mha_flop` plus the two feed-forward matmuls."""
    b, length = (1, src_shape[0]) if len(src_shape) == 2 else (src_shape[0], src_shape[1])
    ffn = 2 * b * length * int(embed_dim) * int(ffn_weight_1_shape[0])
    return _native_mha_flop(src_shape, src_shape, src_shape, embed_dim, num_heads, qkv_weight_shape) + 2 * ffn


#: op → FLOP formula (shapes in, like torch's registry) for the kernels torch does not count.
EXTRA_FLOP_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flop,
    aten._native_multi_head_attention: _native_mha_flop,
    aten._transformer_encoder_layer_fwd: _encoder_layer_flop,
}


def flop_counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` that also counts the kernels in :data:`EXTRA_FLOP_FORMULAS`.
    A formula torch itself gains later takes precedence over ours."""
    from torch.utils.flop_counter import flop_registry

    missing = {op: f for op, f in EXTRA_FLOP_FORMULAS.items() if op not in flop_registry}
    return FlopCounterMode(display=False, custom_mapping=missing)


@contextlib.contextmanager
def parameters_without_grad(module: nn.Module):
    """Run a count with ``module``'s parameters not requiring grad (restored after).

    Why: ``FlopCounterMode``'s module tracker hooks every input of a submodule that
    requires grad. Under ``no_grad`` a *view* of a parameter (``self.query.expand(B, -1,
    -1)``, ``self.pos[:T]``) still requires grad but has no grad function, and torch
    asserts when such a view is passed to a submodule (learned-query attention pooling).
    A count needs no gradients."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


# ----------------------------------------------------------------------------------------
# Ops the counter need not watch (issue 7: shape propagation speed)
# ----------------------------------------------------------------------------------------
# The counter's Python dispatch costs more than many small ops themselves (an eval-mode
# BatchNorm runs ~3x slower under it). These ops dispatch no aten op torch's flop registry
# has a formula for, whatever their arguments: norms, activations, pools, dropout, shape
# and indexing ops, elementwise arithmetic. Exact module types only (a subclass may
# override forward); anything not named here is counted. The list is a hint, not the
# judge: shape propagation still counts the first call of each entry and trusts it only
# when torch counted nothing (tests/test_counting.py checks every entry, and that the
# fast path counts what counting every node does).

#: leaf module types (exact) whose forward the registry counts nothing for
ZERO_FLOP_MODULES: frozenset = frozenset({
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU,
    nn.Sigmoid, nn.Tanh,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity, nn.Flatten,
})

#: call_function targets the registry counts nothing for
ZERO_FLOP_FUNCTIONS: frozenset = frozenset({
    operator.add, operator.iadd, operator.sub, operator.mul, operator.truediv, operator.neg,
    operator.getitem, getattr,
    torch.add, torch.mul, torch.cat, torch.flatten, torch.relu, torch.sigmoid,
    F.relu, F.relu6, F.hardtanh, F.hardswish, F.sigmoid, F.silu, F.gelu, F.dropout,
    F.adaptive_avg_pool2d, F.avg_pool2d, F.max_pool2d,
})

#: call_method names (on tensors) the registry counts nothing for
ZERO_FLOP_METHODS: frozenset = frozenset({
    "view", "reshape", "flatten", "size", "dim", "transpose", "permute", "contiguous", "unsqueeze",
    "squeeze", "chunk", "split", "expand", "mean", "relu", "sigmoid", "add", "mul",
})


def _hooked(module: nn.Module) -> bool:
    """Hooks run inside the module call and may compute anything."""
    from torch.nn.modules import module as _m

    return bool(module._forward_pre_hooks or module._forward_hooks or _m._global_forward_pre_hooks
                or _m._global_forward_hooks)


def zero_flop_key(node: torch.fx.Node, module: Optional[nn.Module] = None) -> Optional[Hashable]:
    """A key for ``node``'s op when it is listed above as counting nothing (``module``: the
    called module of a ``call_module`` node), else None: count it."""
    if node.op == "call_module":
        kind = type(module)
        return ("module", kind) if kind in ZERO_FLOP_MODULES and not _hooked(module) else None
    if node.op == "call_function":
        try:
            return ("function", node.target) if node.target in ZERO_FLOP_FUNCTIONS else None
        except TypeError:  # an unhashable callable
            return None
    if node.op == "call_method":
        return ("method", node.target) if node.target in ZERO_FLOP_METHODS else None
    return None


_CONVS = frozenset({nn.Conv1d, nn.Conv2d, nn.Conv3d})


def conv_flops(counter: FlopCounterMode, module: nn.Module, args: tuple, kwargs: dict) -> Optional[Callable]:
    """For a call of an exact ``nn.Conv1d/2d/3d`` (no hooks, one batched plain tensor in):
    ``flops(out)``, the formula ``counter`` holds for ``aten.convolution`` applied to this
    call, so the call need not run under the counter. Such a call dispatches exactly one
    ``aten.convolution`` of this weight, batch and output (padding modes and string padding
    change only the input's spatial size, which the formula does not read). None: any other
    call; count it."""
    if (type(module) not in _CONVS or kwargs or len(args) != 1 or _hooked(module)
            or type(args[0]) is not torch.Tensor or args[0].dim() != module.weight.dim()):
        return None
    formula = counter.flop_registry[torch.ops.aten.convolution]
    x, weight = args[0], module.weight
    rest = (module.stride, module.padding, module.dilation, False, [0] * (weight.dim() - 2), module.groups)
    if getattr(formula, "__code__", None) is _SHAPE_WRAPPER_CODE:
        # torch's shape_wrapper maps every tensor to its shape with a pytree walk, which
        # costs 30x the formula: hand the shapes to the wrapped formula directly
        shapes = formula.__wrapped__
        bias = None if module.bias is None else module.bias.shape
        return lambda out: shapes(x.shape, weight.shape, bias, *rest, out_shape=out.shape)
    return lambda out: formula(x, weight, module.bias, *rest, out_val=out)


_SHAPE_WRAPPER_CODE = shape_wrapper(lambda: 0).__code__
