"""Tracing: model -> ``torch.fx.GraphModule`` with shapes and per-node MACs.

Why a custom tracer: RNNs (and any module the user names) must stay leaves, stack
traces must be recorded so every later message can point at the user's line, and when
fx fails we want to say *which module* was being traced, not only fx's message.
"""
from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils.flop_counter import FlopCounterMode

from .errors import TraceError

__all__ = ["DcoptTracer", "Traced", "trace", "ALWAYS_LEAF"]

#: Module types fx must never trace into: their internals are fused kernels whose width
#: rules dcopt knows as a whole.
ALWAYS_LEAF: tuple[type, ...] = (nn.RNNBase, nn.MultiheadAttention)

_TORCH_DIR = os.path.dirname(torch.__file__)
_DCOPT_DIR = os.path.dirname(__file__)


class DcoptTracer(torch.fx.Tracer):
    """fx tracer that keeps RNNs and user-named modules as leaves and remembers the
    module stack, so a failure can name the module it happened in."""

    def __init__(self, leaf_modules: Iterable[Any] = ()):
        super().__init__()
        self.record_stack_traces = True
        self.leaf_types = tuple(t for t in leaf_modules if isinstance(t, type))
        self.leaf_names = {t for t in leaf_modules if isinstance(t, str)}
        self.dcopt_stack: list[str] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, ALWAYS_LEAF) or isinstance(m, self.leaf_types) or qualname in self.leaf_names:
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        qualname = self.path_of_module(m)
        self.dcopt_stack.append(qualname)
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self.dcopt_stack.pop()


@dataclass
class Traced:
    """A traced copy of the user's model: the GraphModule plus what shape propagation
    learned. ``node.meta['tensor_meta']`` holds shapes, ``flops[node.name]`` MACs."""

    gm: torch.fx.GraphModule
    example_inputs: tuple
    source: Optional[nn.Module] = None
    macs: dict[str, int] = field(default_factory=dict)


def _user_frame(tb) -> Optional[str]:
    """Innermost traceback frame that is neither torch nor dcopt: the user's line."""
    found = None
    while tb is not None:
        fname = tb.tb_frame.f_code.co_filename
        if not fname.startswith(_TORCH_DIR) and not fname.startswith(_DCOPT_DIR) and not fname.startswith("<"):
            found = f"{fname}:{tb.tb_lineno}"
        tb = tb.tb_next
    return found


def _symbolic_trace(model: nn.Module, leaf_modules, concrete_args) -> torch.fx.GraphModule:
    tracer = DcoptTracer(leaf_modules)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:  # fx raises many types: TraceError, TypeError, RuntimeError...
        module = tracer.dcopt_stack[-1] if tracer.dcopt_stack else ""
        location = _user_frame(sys.exc_info()[2])
        if module:
            suggestion = (f"Make '{module}' (or its type {type(model.get_submodule(module)).__name__}) a leaf: "
                          f"leaf_modules=['{module}'], or pass concrete_args for the value it branches on")
        else:
            suggestion = ("The top-level forward cannot be traced; pass concrete_args for the value it "
                          "branches on, or move the data-dependent part into a submodule and make it a leaf")
        raise TraceError(f"torch.fx cannot trace the model: {type(exc).__name__}: {exc}".strip(),
                         module=module, location=location, suggestion=suggestion) from exc
    name = type(model).__name__
    return torch.fx.GraphModule(tracer.root, graph, name)


class _MeasuringShapeProp(ShapeProp):
    """ShapeProp that also records the MACs (FlopCounterMode flops / 2) of every node."""

    def __init__(self, gm):
        super().__init__(gm)
        self.macs: dict[str, int] = {}
        self._counter: Optional[FlopCounterMode] = None

    def run_node(self, n):
        before = self._counter.get_total_flops()
        out = super().run_node(n)
        flops = self._counter.get_total_flops() - before
        if flops:
            self.macs[n.name] = flops // 2
        return out

    def propagate(self, *args):
        with FlopCounterMode(display=False) as counter:
            self._counter = counter
            try:
                return super().propagate(*args)
            finally:
                self._counter = None


def _set_training(module: nn.Module, flags: dict[str, bool]):
    for name, m in module.named_modules():
        m.training = flags[name]


def trace(model: nn.Module, example_inputs: Optional[Sequence] = None, *, leaf_modules: Iterable[Any] = (),
          concrete_args: Optional[dict] = None, copy_model: bool = True) -> Traced:
    """Trace ``model`` (a deep copy unless ``copy_model=False``) and, with example inputs,
    attach shapes and MACs to every node.

    Shapes are taken in eval mode under ``no_grad``: BatchNorm must not update running
    statistics of anyone's model, and eval mode makes a batch of one valid.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"dcopt expects a torch.nn.Module, got {type(model).__name__}")
    src = copy.deepcopy(model) if copy_model else model
    gm = _symbolic_trace(src, tuple(leaf_modules), concrete_args)
    traced = Traced(gm=gm, example_inputs=tuple(example_inputs) if example_inputs is not None else (), source=src)
    if example_inputs is not None:
        traced.macs = propagate_shapes(gm, traced.example_inputs)
    return traced


def propagate_shapes(gm: torch.fx.GraphModule, example_inputs: tuple) -> dict[str, int]:
    """Run ShapeProp (real tensors) and return the MACs of each node."""
    flags = {name: m.training for name, m in gm.named_modules()}
    gm.eval()
    prop = _MeasuringShapeProp(gm)
    try:
        with torch.no_grad():
            prop.propagate(*example_inputs)
    except Exception as exc:
        node = getattr(prop, "_current_node", None)
        raise TraceError(f"running the model on the example inputs failed: {type(exc).__name__}: {exc}",
                         location=_user_frame(sys.exc_info()[2])) from exc
    finally:
        _set_training(gm, flags)
    return prop.macs
