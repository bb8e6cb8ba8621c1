"""Numeric agreement of two computations of the same function (export, the BatchNorm fold,
feature reordering), with a float64 second opinion before anything is called a dcopt bug.

Why a second opinion: each check compares two float32 computations whose rounding differs
(a sliced matmul sums fewer terms, a permuted one sums them in another order, a folded
BatchNorm multiplies in another order). Relative to the output's scale that rounding is
about 1e-7 — unless the output is small next to the values it was computed from. A mean
over a dimension that a LayerNorm has just normalised is 0 up to rounding: there the two
float32 results differ by 100 % of the output, and a relative check calls an exact rewrite
wrong.

Rounding and a real error behave differently when the precision changes: a rewrite that
is exact differs in float64 by about 2**-29 times its float32 difference, one that is
wrong by its own error in either precision. So a float32 failure is recomputed in float64
and passes when, per output tensor, the float64 results agree within the tolerance or
their difference shrank at least 1e4-fold (``ROUNDING_SHRINK``). An error smaller than
1e-4 of float32's own rounding noise passes — it is invisible in float32 anyway.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Callable, Optional

import torch
from torch import nn

__all__ = ["Agreement", "agreement", "max_relative_error", "to_float64", "float64_copy", "fresh_copies",
           "input_tuple"]


def _as_dict(obj) -> Optional[dict]:
    """A dataclass instance's fields by name (a model may return one), else None."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    return None


def _same_value(a, b) -> bool:
    """``a == b`` for the non-tensor leaves of an output; an ``==`` that does not answer
    with a bool (a container of tensors we do not know) is a difference, never truthiness."""
    try:
        same = a == b
    except Exception:  # noqa: BLE001
        return False
    return same if isinstance(same, bool) else False


def max_relative_error(a, b) -> float:
    """Max abs difference relative to ``a``'s scale (per tensor, the max over a nested
    output); ``inf`` when structures, shapes or non-float values differ."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        a, b = a.detach(), b.detach()   # an output may be a parameter (returned as it is)
        if a.shape != b.shape:
            return float("inf")
        if not a.is_floating_point():
            return 0.0 if torch.equal(a, b) else float("inf")
        if not a.numel():
            return 0.0
        scale = max(float(a.abs().max()), 1e-12)
        return float((a - b.to(a.dtype)).abs().max()) / scale
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b):
        return max((max_relative_error(x, y) for x, y in zip(a, b)), default=0.0)
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return max((max_relative_error(a[k], b[k]) for k in a), default=0.0)
    if _as_dict(a) is not None and type(a) is type(b):
        return max_relative_error(_as_dict(a), _as_dict(b))
    return 0.0 if _same_value(a, b) else float("inf")


def to_float64(obj):
    """``obj`` (a tensor or nested tuple/list/dict of them) with floating tensors as float64;
    integer inputs (token ids, lengths) stay as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.double() if obj.is_floating_point() else obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):   # a namedtuple (PackedSequence)
        return type(obj)(*(to_float64(x) for x in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_float64(x) for x in obj)
    if isinstance(obj, dict):
        return {k: to_float64(v) for k, v in obj.items()}
    if _as_dict(obj) is not None:
        return dataclasses.replace(obj, **to_float64(_as_dict(obj)))
    return obj


def input_tuple(example_inputs) -> tuple:
    """The positional example inputs as a tuple: one tensor is ``(t,)``. A dict is refused
    rather than read as ``tuple(d)`` — its keys — which sent strings into the model and
    ended in a confusing error from its first layer."""
    from collections.abc import Mapping

    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, Mapping):
        raise TypeError("example inputs are the forward's positional arguments: pass a tuple such as (x,) or "
                        "(x, mask); a dict would be read as its keys (a model taking one dict argument: ({...},))")
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(f"example inputs must be a tensor or a tuple of the forward's arguments, "
                    f"not {type(example_inputs).__name__}")


def fresh_copies(inputs):
    """Copies of the tensors in ``inputs`` (nested) for one run: a model that changes its
    input in place (the user's own class keeps doing so) must neither hand the next run of
    a check other values nor change the user's tensors."""
    return torch.utils._pytree.tree_map_only(torch.Tensor, torch.clone, inputs)


def float64_copy(module: nn.Module, share: tuple = ()) -> nn.Module:
    """A float64 copy of ``module``; the objects in ``share`` are not copied (they are not
    registered submodules, e.g. a DynamicModel's template of the user's model)."""
    memo = {id(o): o for o in share}
    return copy.deepcopy(module, memo).double()


#: a float32 difference that shrinks at least this much in float64 is rounding (exact
#: rewrites shrink by about 2**-29 ≈ 2e-9; a real error does not shrink)
ROUNDING_SHRINK = 1e-4


def _pairs(a, b) -> Optional[list]:
    """The corresponding tensors of two nested outputs, or None when structures differ."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return [(a, b)]
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b):
        parts = [_pairs(x, y) for x, y in zip(a, b)]
    elif isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        parts = [_pairs(a[k], b[k]) for k in a]
    elif _as_dict(a) is not None and type(a) is type(b):
        return _pairs(_as_dict(a), _as_dict(b))
    else:
        return [] if _same_value(a, b) else None
    return None if any(p is None for p in parts) else [t for p in parts for t in p]


def _abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


@dataclasses.dataclass
class Agreement:
    """A check's verdict. ``error``: the float32 relative error (as
    :func:`max_relative_error`); ``how``: ``"float32"`` (decided there), ``"float64"``
    (a float32 failure recomputed: ``ok`` says whether it was rounding), or
    ``"float32 only"`` (the model could not run in float64; the float32 failure stands)."""
    ok: bool
    error: float
    how: str

    def describe(self, tol: float) -> str:
        extra = {"float32": "", "float64": ", and not float32 rounding: it persists in float64",
                 "float32 only": "; the model could not be rechecked in float64"}[self.how]
        return f"relative error {self.error:.3g} > {tol:g}{extra}"


def agreement(reference, candidate, tol: float, rerun: Callable[[], tuple[Any, Any]]) -> Agreement:
    """Do ``candidate``'s outputs equal ``reference``'s? ``rerun()`` computes the same two
    outputs in float64; it is called only when float32 says no."""
    err = max_relative_error(reference, candidate)
    if err <= tol or not math.isfinite(err):
        return Agreement(err <= tol, err, "float32")
    try:
        with torch.no_grad():
            ref64, cand64 = rerun()
    except Exception:  # noqa: BLE001 - no second opinion possible: the first one stands
        return Agreement(False, err, "float32 only")
    pairs32, pairs64 = _pairs(reference, candidate), _pairs(ref64, cand64)
    if pairs32 is None or pairs64 is None or len(pairs32) != len(pairs64):
        return Agreement(False, err, "float64")
    for (a32, b32), (a64, b64) in zip(pairs32, pairs64):
        if not a32.is_floating_point() or max_relative_error(a32, b32) <= tol:
            continue
        if max_relative_error(a64, b64) <= tol:
            continue
        if _abs_diff(a64, b64) > ROUNDING_SHRINK * _abs_diff(a32, b32):
            return Agreement(False, err, "float64")
    return Agreement(True, err, "float64")
