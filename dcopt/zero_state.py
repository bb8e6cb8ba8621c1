"""An RNN started from zeros the forward made itself is an RNN started from nothing.

Why: tutorials and much real code write ``h0 = torch.zeros(self.num_layers, x.size(0),
self.hidden_size)`` and pass it to a GRU/LSTM. The zeros are built with the hidden size
as a literal, so to the analysis they are a fixed-width tensor meeting the hidden
units, and the RNN kept its width. But torch's RNNs (their own forward; a subclass's
may mean something else by no state) start from zeros of the right
shape, dtype and device when no initial state is given (``hx=None``), so passing
all-zero states computes the same numbers, bit for bit. This pass drops such states
from the RNN calls of the traced graph, and the zeros no other node uses.

Only states that are zeros by construction are dropped: ``torch.zeros``,
``x.new_zeros``, ``torch.zeros_like``, and those passed through casts and copies that
keep zeros zeros (``.to(device)``, ``.float()``, ``.contiguous()``, ``.detach()``,
``.clone()``). An LSTM's ``(h0, c0)`` is dropped only when both are such zeros. Any other
state (learned, computed, passed in) stays as it was. A state of the wrong shape or
dtype could not get this far: the user's model ran on the example inputs, and torch
checks the state's shape and dtype on every call.

The export: zeros sized by the RNN's own attribute (``self.rnn.hidden_size``) follow the
exported RNN, and your class is kept; zeros sized by a literal do not (your class fails
export's check at a smaller width), and the traced graph, which has no zeros, is
returned as a ``torch.fx.GraphModule``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch import nn

__all__ = ["drop_zero_initial_states"]

_ZERO_FACTORIES = {torch.zeros, torch.zeros_like}
_ZERO_METHODS = {"new_zeros"}
#: methods whose result is all zeros when their input is (casts, copies, device moves)
_KEEPS_ZEROS = {"to", "float", "double", "half", "bfloat16", "contiguous", "detach", "clone", "cpu", "cuda",
                "type_as"}


def _is_zeros(arg: Any) -> bool:
    """Whether ``arg`` is a node whose value is all zeros by construction."""
    if not isinstance(arg, torch.fx.Node):
        return False
    if arg.op == "call_function" and arg.target in _ZERO_FACTORIES:
        return True
    if arg.op == "call_method" and arg.target in _ZERO_METHODS:
        return True
    if arg.op == "call_method" and arg.target in _KEEPS_ZEROS:
        return _is_zeros(arg.args[0])
    return False


def _initial_state(node: torch.fx.Node) -> tuple[str, Any]:
    """Where an RNN call holds its initial state: ("arg", value) or ("kwarg", value)."""
    if len(node.args) > 1:
        return "arg", node.args[1]
    return "kwarg", node.kwargs.get("hx")


def _torch_forward(module) -> bool:
    """Whether ``module`` is an RNN that runs torch's own forward (a subclass may give
    ``hx=None`` another meaning, such as a learned initial state)."""
    return isinstance(module, nn.RNNBase) and type(module).forward in {
        cls.forward for cls in (nn.RNNBase, nn.RNN, nn.GRU, nn.LSTM)}


def drop_zero_initial_states(gm: torch.fx.GraphModule) -> bool:
    """Drop all-zero initial states from ``gm``'s RNN calls; True when the graph changed."""
    modules = dict(gm.named_modules())
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not _torch_forward(modules.get(node.target)):
            continue
        where, state = _initial_state(node)
        states = list(state) if isinstance(state, (tuple, list)) else [state]
        if state is None or not all(_is_zeros(s) for s in states):
            continue
        if where == "arg":
            node.args = node.args[:1] + node.args[2:]
        else:
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "hx"}
        for s in dict.fromkeys(states):   # (z, z): one node given as both h0 and c0
            _erase_unused(gm.graph, s)
        changed = True
    return changed


def _erase_unused(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    """Erase the zeros chain that no longer has users (only it: fx's dead-code pass
    would also drop the model's own unused calls, whose side effects — BatchNorm
    statistics, random draws — are part of what it computes)."""
    if node.users or not _is_zeros(node):
        return
    inputs = [a for a in dict.fromkeys(node.all_input_nodes) if _is_zeros(a)]
    graph.erase_node(node)
    for a in inputs:
        _erase_unused(graph, a)
