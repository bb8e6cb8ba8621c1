"""Traced forwards for torch layers whose own ``forward`` fx cannot trace.

Why: ``nn.TransformerEncoderLayer.forward`` first chooses between a fused kernel and
its plain computation by reading tensor properties (``src.dim()``, ``requires_grad``,
devices, hooks): control flow on values, which fx cannot trace. So fx kept the layer
whole, and its feed-forward width (``dim_feedforward``, usually 4 × d_model and most of
an encoder's MACs) stayed fixed, together with everything feeding it.

The plain computation (torch's "slow path", the one every training step takes) is only
module calls: norms, ``self_attn`` (a leaf), dropouts, ``linear1`` → activation →
``linear2``. dcopt traces that path, so ``linear1``'s output is an ordinary group. Why
this is exact: the fused kernel computes the same function (torch tests the two paths
against each other; they differ by rounding), and it reads ``dim_feedforward`` from
``linear1.weight``'s shape, so the exported layer — torch's own class with smaller
``linear1``/``linear2`` — picks its path at run time as the user's layer does.

The decoder side has no fused path: ``nn.TransformerDecoderLayer``'s own forward traces
(fx only kept it whole because it is a torch.nn layer); ``nn.TransformerDecoder`` and
``nn.Transformer`` need a traced forward for one step each (the causal-mask check, the
input-size checks).

What a traced copy cannot reproduce is not approximated. An encoder-layer subclass that
overrides its forward or a block it calls is not traced as torch's layer (torch's fused
path would ignore the override; fx then fails inside torch's forward, and the layer
becomes an opaque block). ``nn.TransformerEncoder`` called with
``src_key_padding_mask`` may take its nested-tensor path (in eval without grad it
returns zeros at the padded positions, and ``torch.utils.flop_counter`` cannot measure
nested tensors, so neither tracing nor keeping it whole works): refused, with the way
out (``enable_nested_tensor=False``).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Optional

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import transformer as _tx

from .errors import TraceRefusal

__all__ = ["traced_forward", "root_suggestion", "kept_whole_reason"]

#: torch's private helpers the encoder's forward calls; a torch without them keeps the
#: modules whole (a leaf, as before) rather than guessing their meaning
_HELPERS = all(hasattr(F, n) for n in ("_canonical_mask", "_none_or_dtype")) and \
    all(hasattr(_tx, n) for n in ("_get_seq_len", "_detect_is_causal_mask"))


def _is_proxy(x: Any) -> bool:
    return isinstance(x, torch.fx.Proxy)


def _canonical_mask(tracer, mask, name: str, other, other_name: str, src, check_other: bool = True):
    """``F._canonical_mask`` as torch's forward calls it: a bool mask becomes a float mask
    with -inf, in ``src``'s dtype. Where the mask (or the mask it is checked against) is a
    graph value, the conversion is a call in the graph (of torch's own function: the
    exported graph still runs without dcopt); a constant mask is converted now."""
    if mask is None:
        return None
    other_type = (tracer.create_proxy("call_function", F._none_or_dtype, (other,), {}) if _is_proxy(other)
                  else F._none_or_dtype(other))
    kwargs = dict(mask=mask, mask_name=name, other_type=other_type, other_name=other_name, target_type=src.dtype,
                  check_other=check_other)
    if _is_proxy(mask) or _is_proxy(other_type):
        return tracer.create_proxy("call_function", F._canonical_mask, (), kwargs)
    return F._canonical_mask(**kwargs)


def _encoder_layer(tracer, layer: nn.TransformerEncoderLayer, src, src_mask=None, src_key_padding_mask=None,
                   is_causal=False):
    """``nn.TransformerEncoderLayer.forward`` without the fused-kernel branch."""
    src_key_padding_mask = _canonical_mask(tracer, src_key_padding_mask, "src_key_padding_mask", src_mask,
                                           "src_mask", src)
    src_mask = _canonical_mask(tracer, src_mask, "src_mask", None, "", src, check_other=False)
    x = src
    if layer.norm_first:
        x = x + layer._sa_block(layer.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
        x = x + layer._ff_block(layer.norm2(x))
    else:
        x = layer.norm1(x + layer._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
        x = layer.norm2(x + layer._ff_block(x))
    return x


def _causal(tracer, mask, is_causal, src, batch_first: bool):
    """``_detect_is_causal_mask(mask, is_causal, seq_len)`` as torch's stacks call it. With a
    mask and no hint, torch compares the mask with the causal one of the input's length,
    at run time: so does the graph (the mask may be a graph value, and the length is)."""
    if mask is None or (is_causal is not None and not _is_proxy(is_causal)):
        return is_causal is True
    seq_len = tracer.create_proxy("call_function", _tx._get_seq_len, (src, batch_first), {})
    return tracer.create_proxy("call_function", _tx._detect_is_causal_mask, (mask, is_causal, seq_len), {})


def _encoder(tracer, encoder: nn.TransformerEncoder, src, mask=None, src_key_padding_mask=None, is_causal=None):
    """``nn.TransformerEncoder.forward`` when its nested-tensor path can never run. Its
    layers are called as modules: each is traced as its own type says (a layer of the
    user's own class too)."""
    batch_first = encoder.layers[0].self_attn.batch_first   # read first, as torch does
    src_key_padding_mask = _canonical_mask(tracer, src_key_padding_mask, "src_key_padding_mask", mask, "mask", src)
    mask = _canonical_mask(tracer, mask, "mask", None, "", src, check_other=False)
    is_causal = _causal(tracer, mask, is_causal, src, batch_first)
    output = src
    for mod in encoder.layers:
        output = mod(output, src_mask=mask, is_causal=is_causal, src_key_padding_mask=src_key_padding_mask)
    if encoder.norm is not None:
        output = encoder.norm(output)
    return output


def _decoder(tracer, decoder: nn.TransformerDecoder, tgt, memory, tgt_mask=None, memory_mask=None,
             tgt_key_padding_mask=None, memory_key_padding_mask=None, tgt_is_causal=None, memory_is_causal=False):
    """``nn.TransformerDecoder.forward``: its only step fx cannot take is the causal check."""
    tgt_is_causal = _causal(tracer, tgt_mask, tgt_is_causal, tgt, decoder.layers[0].self_attn.batch_first)
    output = tgt
    for mod in decoder.layers:
        output = mod(output, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                     tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                     tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)
    if decoder.norm is not None:
        output = decoder.norm(output)
    return output


def _transformer(tracer, model: nn.Transformer, src, tgt, src_mask=None, tgt_mask=None, memory_mask=None,
                 src_key_padding_mask=None, tgt_key_padding_mask=None, memory_key_padding_mask=None,
                 src_is_causal=None, tgt_is_causal=None, memory_is_causal=False):
    """``nn.Transformer.forward`` without its checks of the inputs' sizes (the converted
    model runs at the shapes it was traced with; the export, torch's class, checks)."""
    memory = model.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=src_is_causal)
    return model.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                         tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                         tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)


def _fused_activation_agrees(layer: nn.TransformerEncoderLayer) -> bool:
    """torch's fused eval path applies ReLU or erf-GELU by a flag set in ``__init__``
    (``activation_relu_or_gelu``), whatever ``layer.activation`` is now: GELU(approximate=
    'tanh') counts as GELU, and an activation swapped after construction keeps the old
    flag. Where the two disagree, the user's layer computes other numbers in eval without
    grad than in training, and no traced copy can follow both."""
    flag, act = getattr(layer, "activation_relu_or_gelu", 0), layer.activation
    if flag == 1:
        return act is F.relu or type(act) is nn.ReLU
    if flag == 2:
        return act is F.gelu or (type(act) is nn.GELU and act.approximate == "none")
    return True


def kept_whole_reason(module: nn.Module) -> str:
    """Why a transformer layer of torch's stayed a leaf (for the rejection)."""
    name = type(module).__name__
    if isinstance(module, nn.TransformerEncoderLayer) and not _fused_activation_agrees(module):
        return (f"{name}'s activation ({module.activation!r}) is not the one torch's fused eval path applies "
                f"(activation_relu_or_gelu={module.activation_relu_or_gelu}, set when it was built): it computes "
                "other numbers in eval without grad than in training, so it is kept whole, its feed-forward "
                "width fixed; build the layer with the activation it should use")
    if not _HELPERS:
        return f"{name} is kept whole: this torch lacks the helpers its forward calls, which dcopt traces"
    return f"{name} named a leaf module: it is kept whole, so its feed-forward widths and the features it reads " \
           "keep their widths"


def _own_methods(module: nn.Module, base: type, names: tuple[str, ...]) -> bool:
    """True when ``module`` runs ``base``'s own code for each of ``names`` (a subclass
    overriding any of them computes something the traced copy would not)."""
    return all(getattr(type(module), n) is getattr(base, n) for n in names)


def _refuse_nested(tracer, encoder: nn.TransformerEncoder) -> None:
    raise TraceRefusal(
        "nn.TransformerEncoder is called with src_key_padding_mask and enable_nested_tensor=True: in eval "
        "without grad it then runs on nested tensors and returns zeros at the padded positions, which a "
        "traced copy cannot reproduce and torch's FLOP counter cannot measure",
        module=tracer.path_of_module(encoder), location=tracer.user_location(),
        suggestion="Build it with enable_nested_tensor=False (the same outputs, except that padded positions "
                   "hold computed values instead of zeros, and no nested-tensor speed-up in inference): dcopt "
                   "then learns its feed-forward widths")


def traced_forward(tracer, module: nn.Module, args: tuple, kwargs: dict) -> Optional[Callable]:
    """The forward fx should trace for ``module`` in this call, or None (keep it a leaf)."""
    if not _HELPERS:
        return None
    if isinstance(module, nn.TransformerEncoderLayer):
        if _own_methods(module, nn.TransformerEncoderLayer, ("forward", "_sa_block", "_ff_block")) and \
                _fused_activation_agrees(module):
            return partial(_encoder_layer, tracer, module)
        return None
    if isinstance(module, nn.TransformerDecoderLayer):
        # no fused path: torch's own forward traces (fx keeps torch.nn layers whole by default)
        return module.forward
    if isinstance(module, nn.TransformerDecoder):
        return partial(_decoder, tracer, module) if _own_methods(module, nn.TransformerDecoder, ("forward",)) \
            else None
    if isinstance(module, nn.Transformer):
        return partial(_transformer, tracer, module) if _own_methods(module, nn.Transformer, ("forward",)) \
            else None
    if isinstance(module, nn.TransformerEncoder):
        if not _own_methods(module, nn.TransformerEncoder, ("forward",)):
            return None
        padding = kwargs.get("src_key_padding_mask", args[2] if len(args) > 2 else None)
        mask = kwargs.get("mask", args[1] if len(args) > 1 else None)
        if padding is not None and mask is None and getattr(module, "use_nested_tensor", False):
            _refuse_nested(tracer, module)   # torch takes the nested path only without ``mask``
        return partial(_encoder, tracer, module)
    return None


_TRACED_TYPES = (nn.TransformerEncoderLayer, nn.TransformerEncoder, nn.TransformerDecoderLayer,
                 nn.TransformerDecoder, nn.Transformer)


def root_suggestion(model: nn.Module) -> Optional[str]:
    """The way out when the model itself is one of these layers: fx traces a root's
    forward directly (it is never "called" as a submodule), so the traced forward above
    cannot stand in for it."""
    if isinstance(model, _TRACED_TYPES):
        return (f"dcopt traces torch's {type(model).__name__} when it is called as a submodule, not as the model "
                "itself: wrap it (a module whose forward returns self.encoder(x)) and convert the wrapper")
    return None
