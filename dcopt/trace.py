"""Tracing: model -> ``torch.fx.GraphModule`` with shapes and per-node MACs.

Why a custom tracer: RNNs (and any module the user names) must stay leaves, stack
traces must be recorded so every later message can point at the user's line, and when
fx fails we want to say *which module* was being traced, not only fx's message.

Trace what can be traced: when fx fails inside a submodule (data-dependent control flow,
``int(lengths.max())``, iterating over a proxy, ``len(x)``...), that innermost module
becomes an *opaque leaf* and tracing is retried, until it succeeds or the failure is in
the top-level forward itself (then :class:`~dcopt.TraceError`). Opaque leaves run as
black boxes: shapes come from running them on the example inputs, the analysis keeps
their inputs and outputs at full width and never touches their parameters.
``strict_trace=True`` turns this off (any fx failure is a TraceError).

The traced graph is made functional before anything reads it (:mod:`dcopt.inplace`):
gates copy tensors and export drops unused nodes, so an in-place op must be an edge of
the graph. A model with forward hooks, or one torch cannot deep-copy (``nn.utils.prune``),
is a TraceError that says what to remove: dcopt never changes the user's model itself.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import linecache
import os
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.fx
from torch.fx.immutable_collections import immutable_dict, immutable_list
from torch import nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata

from .counting import _CONVS, conv_flops, flop_counter, parameters_without_grad, zero_flop_key
from .errors import TraceError, TraceRefusal, source_location
from .inplace import functionalize, restore_dtypes
from .numcheck import fresh_copies
from .shape_only import ValueGuard, shape_only_call, shapes_only_safe, value_blind
from .traceable import root_suggestion, traced_forward
from .zero_state import drop_zero_initial_states

__all__ = ["DcoptTracer", "Traced", "OpaqueLeaf", "trace", "ALWAYS_LEAF"]

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
        # not fx's stack traces: they format the whole Python stack for every node (half
        # the tracing time); create_node records the one frame dcopt reports instead
        self.record_stack_traces = False
        self.leaf_types = tuple(t for t in leaf_modules if isinstance(t, type))
        self.leaf_names = {t for t in leaf_modules if isinstance(t, str)}
        self.dcopt_stack: list[str] = []
        self.leaf_seen: set[str] = set()   # qualified names is_leaf_module answered True for
        self.traced_through: set[int] = set()   # modules whose forward traceable.py supplies, this call

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        from .rules import REGISTRY

        if isinstance(m, ALWAYS_LEAF) or isinstance(m, self.leaf_types) or qualname in self.leaf_names:
            leaf = True
        elif id(m) in self.traced_through:
            leaf = False
        elif REGISTRY.for_module(m) is not None:
            leaf = True  # dcopt has a rule for it as a whole (also for user-registered layers)
        else:
            leaf = super().is_leaf_module(m, qualname)
        if leaf:
            self.leaf_seen.add(qualname)
        return leaf

    def create_arg(self, a: Any):
        """fx writes every dict as a ``{...}`` literal, so a model returning an
        ``OrderedDict`` (torchvision's segmentation and detection models) would come back
        as a plain ``dict`` from the converted model, the export and the saved code. An
        ``OrderedDict`` becomes a call of its constructor instead, as fx does for a
        namedtuple."""
        if type(a) is collections.OrderedDict:
            return self.create_node("call_function", collections.OrderedDict,
                                    (super().create_arg(dict(a)),), {})
        return super().create_arg(a)

    def user_location(self) -> Optional[str]:
        """``file:line`` of the user's line being traced now (for errors raised while tracing)."""
        return source_location(_user_call_site(sys._getframe(1)))

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        if not node.stack_trace:
            node.stack_trace = _user_call_site(sys._getframe(1))
        return node

    def call_module(self, m, forward, args, kwargs):
        qualname = self.path_of_module(m)
        self.dcopt_stack.append(qualname)
        named_leaf = isinstance(m, self.leaf_types) or qualname in self.leaf_names
        traced = None if named_leaf else traced_forward(self, m, args, kwargs)
        if traced is not None:
            # a torch layer whose own forward fx cannot trace: trace its plain computation
            forward = traced
            self.traced_through.add(id(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except BaseException as exc:
            # The stack unwinds before the caller of trace() sees the exception: remember
            # it on the exception, at its innermost module (the first handler to see it).
            if not hasattr(exc, _STACK_ATTR):
                try:
                    setattr(exc, _STACK_ATTR, list(self.dcopt_stack))
                except Exception:  # pragma: no cover - exotic exception types without __dict__
                    pass
            raise
        finally:
            self.dcopt_stack.pop()
            self.traced_through.discard(id(m))


_STACK_ATTR = "_dcopt_module_stack"


def _user_call_site(frame) -> Optional[str]:
    """The innermost frame outside torch and dcopt, in fx's ``node.stack_trace`` format
    (``File "path", line N, in name`` and the code line), which is all
    :func:`~dcopt.errors.source_location` reads of fx's full stack. Like fx, only a
    frame at or inside a ``forward`` counts (nodes the tracer makes by itself, such as
    placeholders, have no user line)."""
    found = None
    while frame is not None:
        code = frame.f_code
        if found is None:
            fname = code.co_filename
            if not fname.startswith(_TORCH_DIR) and not fname.startswith(_DCOPT_DIR):
                found = frame
        if found is not None and code.co_name == "forward":
            fname, line = found.f_code.co_filename, found.f_lineno
            return (f'File "{fname}", line {line}, in {found.f_code.co_name}\n'
                    f'    {linecache.getline(fname, line).strip()}')
        frame = frame.f_back
    return None


@dataclass
class OpaqueLeaf:
    """A submodule fx could not trace, kept as a black box (issue 10).

    ``name``: qualified module name; ``type``: its class name; ``reason``: fx's message;
    ``location``: ``file:line`` in the user's code where tracing failed.
    """

    name: str
    type: str
    reason: str
    location: Optional[str] = None

    def to_dict(self) -> dict:
        return dict(name=self.name, type=self.type, reason=self.reason, location=self.location)

    def describe(self) -> str:
        where = f" at {self.location}" if self.location else ""
        return f"fx could not trace it: {self.reason}{where}"


@dataclass
class Traced:
    """A traced copy of the user's model: the GraphModule plus what shape propagation
    learned. ``node.meta['tensor_meta']`` holds shapes, ``flops[node.name]`` MACs."""

    gm: torch.fx.GraphModule
    example_inputs: tuple
    source: Optional[nn.Module] = None
    macs: dict[str, int] = field(default_factory=dict)
    #: submodules fx could not trace, made leaves automatically (empty with strict_trace)
    opaque: list[OpaqueLeaf] = field(default_factory=list)
    #: where the forward computes something else in train mode than in eval mode, which
    #: the eval-mode trace fixed (``trace(..., compare_train=True)``); None: nowhere
    train_branch: Optional[str] = None
    #: the user's lines that switch gradients on or off (``torch.no_grad()``,
    #: ``set_grad_enabled``, ``inference_mode``): fx records none of them
    grad_mode_sites: list[str] = field(default_factory=list)


def _user_frame(tb) -> Optional[str]:
    """Innermost traceback frame that is neither torch nor dcopt: the user's line."""
    found = None
    while tb is not None:
        fname = tb.tb_frame.f_code.co_filename
        if not fname.startswith(_TORCH_DIR) and not fname.startswith(_DCOPT_DIR) and not fname.startswith("<"):
            found = f"{fname}:{tb.tb_lineno}"
        tb = tb.tb_next
    return found


@contextlib.contextmanager
def _watching_grad_mode(sites: list[str]):
    """Record where the traced forward switches gradients on or off. torch.fx runs the
    Python of ``with torch.no_grad():`` while tracing but writes nothing of it into the
    graph, so the traced model computes gradients the user's model does not (a frozen
    feature extractor would be trained). Calls made by torch or dcopt themselves are not
    the user's and are not recorded."""
    real_set, real_inference = torch._C._set_grad_enabled, torch._C._InferenceMode

    def note(frame) -> None:
        while frame is not None and frame.f_code.co_filename.startswith(_TORCH_DIR):
            frame = frame.f_back
        if frame is not None and not frame.f_code.co_filename.startswith(_DCOPT_DIR):
            site = _user_call_site(frame)
            if site and site not in sites:
                sites.append(site)

    def set_grad_enabled(mode):
        note(sys._getframe(1))
        return real_set(mode)

    def inference_mode(*args, **kwargs):
        note(sys._getframe(1))
        return real_inference(*args, **kwargs)

    torch._C._set_grad_enabled, torch._C._InferenceMode = set_grad_enabled, inference_mode
    try:
        yield sites
    finally:
        torch._C._set_grad_enabled, torch._C._InferenceMode = real_set, real_inference


class _Buffers:
    """The model's buffers before tracing, so that every trace attempt starts from them.

    fx runs the forward's Python while tracing: an assignment (``self.cnt = self.cnt * 2``)
    replaces a buffer — with a graph value, in a trace with buffers as graph values — and
    an in-place write (``self.calls.add_(1)``) changes its values, once, with nothing of
    it in the graph. ``analyze`` traces the user's own model, so the values are kept too
    (buffers are small) and given back."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.held = {name: dict(m._buffers) for name, m in model.named_modules()}
        self.versions = {id(b): (b._version, b.detach().clone()) for bs in self.held.values()
                         for b in bs.values() if isinstance(b, torch.Tensor) and not b.is_inference()}

    def restore(self) -> bool:
        """Put back buffers the forward replaced; whether it replaced any."""
        changed = False
        for name, m in self.model.named_modules():
            before = self.held.get(name, {})
            if any(m._buffers.get(k) is not v for k, v in before.items()):
                m._buffers.update(before)
                changed = True
        return changed

    def written_in_place(self) -> list[str]:
        """The buffers the forward wrote in place, their values given back."""
        written = []
        with torch.no_grad():
            for name, bs in self.held.items():
                for k, b in bs.items():
                    version, values = self.versions.get(id(b), (None, None))
                    if version is not None and b._version != version:
                        b.copy_(values)
                        written.append(f"{name}.{k}".lstrip("."))
        return sorted(written)


def _symbolic_trace(model: nn.Module, leaf_modules, concrete_args, strict_trace: bool = True,
                    lazy_code: bool = False) -> tuple[torch.fx.GraphModule, list[OpaqueLeaf]]:
    """fx-trace ``model``. Unless ``strict_trace``, a failure inside a submodule makes the
    innermost traced (non-leaf) module on the stack an opaque leaf and tracing is retried;
    every retry adds a new leaf, so this ends after at most one retry per module."""
    opaque: list[OpaqueLeaf] = []
    # Buffers are plain tensors to fx by default, so ``self.pe[:x.size(1)]`` (a positional
    # encoding cut to the input's length) fails: a real tensor indexed by a traced number.
    # Then dcopt traces once more with buffers as graph values, which takes it. Not first:
    # a forward that branches on a buffer's value, or writes one, traces (or is refused)
    # as it always did.
    proxy_buffers, tried_proxy = False, False
    buffers = _Buffers(model)
    while True:
        tracer = DcoptTracer(tuple(leaf_modules) + tuple(o.name for o in opaque))
        tracer.proxy_buffer_attributes = proxy_buffers
        try:
            graph = tracer.trace(model, concrete_args=concrete_args)
            # the model's own buffers back (a plain trace ran an assignment once: convert's
            # full-width check then compares the graph with the user's first call); a
            # proxied trace that replaced one put a graph value there: not this way
            if buffers.restore() and proxy_buffers:
                raise TraceError("the forward assigns a buffer")
        except TraceRefusal:
            buffers.restore()
            raise
        except Exception as exc:  # fx raises many types: TraceError, TypeError, RuntimeError...
            buffers.restore()
            if not tried_proxy:
                tried_proxy = proxy_buffers = True
                continue
            if proxy_buffers:   # no better that way: the plain trace's error is the one to report
                proxy_buffers = False
                continue
            stack = getattr(exc, _STACK_ATTR, None) or []
            # innermost module whose forward fx was running (a leaf failing to be called
            # as a whole is its caller's problem)
            module = next((q for q in reversed(stack) if q not in tracer.leaf_seen), "")
            location = _user_frame(sys.exc_info()[2])
            reason = f"{type(exc).__name__}: {exc}".strip()
            known = _known_cause(sys.exc_info()[2]) or _known_message(str(exc))
            if module and not strict_trace and module not in {o.name for o in opaque}:
                opaque.append(OpaqueLeaf(name=module, type=type(model.get_submodule(module)).__name__,
                                         reason=known[0] if known else _first_line(reason), location=location))
                continue
            if module:
                suggestion = (f"Make '{module}' (or its type {type(model.get_submodule(module)).__name__}) a "
                              f"leaf: leaf_modules=['{module}'], or pass concrete_args for the value it "
                              "branches on" + ("; without strict_trace=True dcopt does this by itself"
                                               if strict_trace else ""))
            else:
                suggestion = ("The top-level forward cannot be traced; pass concrete_args for the value it "
                              "branches on, or move the data-dependent part into a submodule (dcopt then "
                              "keeps that submodule as an opaque leaf and optimises the rest)")
                if opaque:
                    suggestion += ("; submodules already made opaque leaves: "
                                   + ", ".join(o.name for o in opaque))
            if known:   # the cause is known: its fix, not the generic advice about branching
                suggestion = f"{known[0]}: {known[1]}"
            if not module and root_suggestion(model):
                suggestion = root_suggestion(model)
            raise TraceError(f"torch.fx cannot trace the model: {reason}",
                             module=module, location=location, suggestion=suggestion) from exc
        written = buffers.written_in_place()
        if written:
            raise TraceError(f"the forward changes buffer(s) {', '.join(written)} in place: torch.fx runs that "
                             "once while tracing and records nothing of it, so the converted model would never "
                             "change them and would compute something else from the second call on",
                             suggestion="Make the module that owns the buffer a leaf (leaf_modules=[...]: its "
                                        "forward then runs as written, its widths fixed), or update the state "
                                        "outside forward")
        name = type(model).__name__
        return _graph_module_class(lazy_code)(tracer.root, graph, name), opaque


#: torch functions fx cannot trace through, by the file they live in: what they are, and
#: what to do about it at the top level. fx's own error from inside them
#: (``__cuda_array_interface__ must be a dict``) names neither.
_UNTRACEABLE = {
    os.path.join("nn", "utils", "rnn.py"): (
        "packed sequences (pack_padded_sequence / pad_packed_sequence) cannot be traced by torch.fx",
        "put pack → RNN → unpack in one submodule, which dcopt keeps as an opaque leaf (its widths fixed), "
        "or run the RNN on the padded tensor"),
}


#: fx errors whose own words do not say what to change, by a phrase of the message
_MESSAGES = {
    "does not support item assignment": (
        "torch.fx cannot trace assignment into a tensor (h[:, 0] = 0, h[mask] = v)",
        "write it out of place (torch.where, masked_fill, index_fill or torch.cat), or move it into a "
        "submodule, which dcopt keeps as an opaque leaf (its widths fixed)"),
}


def _known_message(text: str) -> Optional[tuple[str, str]]:
    return next((known for phrase, known in _MESSAGES.items() if phrase in text), None)


def _known_cause(tb) -> Optional[tuple[str, str]]:
    """(what, way out) when the failure happened inside one of :data:`_UNTRACEABLE`."""
    for frame, _ in traceback.walk_tb(tb):
        fname = frame.f_code.co_filename
        if fname.startswith(_TORCH_DIR):
            for tail, known in _UNTRACEABLE.items():
                if fname.endswith(tail):
                    return known
    return None


def _graph_module_class(lazy_code: bool) -> type:
    """fx's lazy GraphModule generates and compiles the module's Python code only when
    it is first run or read: the analysis never runs the traced module, and the code
    cost a tenth of ``analyze``."""
    if lazy_code:
        try:
            from torch.fx._lazy_graph_module import _LazyGraphModule
            return _LazyGraphModule
        except ImportError:  # pragma: no cover - a torch without it
            pass
    return torch.fx.GraphModule


def _first_line(text: str) -> str:
    """fx's messages run on with advice about concrete_args; the first line is the reason."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else text


def _mutable(value):
    """fx stores a node's list and dict arguments as immutable containers and its generated
    code builds fresh ones on every call; a function that writes into its list argument
    (torchvision's Swin3d window helper) fails on the stored ones. Fresh copies, as the
    generated code passes."""
    if isinstance(value, immutable_list):
        return [_mutable(v) for v in value]
    if isinstance(value, immutable_dict):
        return {k: _mutable(v) for k, v in value.items()}
    if type(value) is tuple:
        return tuple(_mutable(v) for v in value)
    return value


class _MeasuringShapeProp(torch.fx.Interpreter):
    """fx's ShapeProp (``node.meta['tensor_meta']``, ``node.meta['type']``) that also records
    the MACs (FlopCounterMode flops / 2) of every node.

    Faster than ShapeProp under a counter, same shapes and counts:

    * the counter watches one node at a time, and not at all an op
      :func:`~dcopt.counting.zero_flop_key` lists as counting nothing once its first call
      here confirmed that torch counts nothing for it, nor a plain convolution, whose count
      :func:`~dcopt.counting.conv_flops` takes from torch's formula directly (the counter's
      Python dispatch cost a third of propagation). ``count_all``: watch every node.
    * tensor metadata leaves out the memory format (ShapeProp's contiguity checks run in
      Python and cost 10 % of propagation; nothing in dcopt reads it).
    * no per-node context manager, submodules looked up in a dict.
    """

    def __init__(self, gm, count_all: bool = False, modules: Optional[dict] = None, shapes_only: bool = False):
        super().__init__(gm)
        self.macs: dict[str, int] = {}
        self.count_all = count_all
        self.shapes_only = shapes_only
        self._guard = ValueGuard() if shapes_only else None
        self._counter = flop_counter()
        self._zero: dict[Any, bool] = {}   # zero_flop_key -> its first call counted nothing
        self._modules = modules if modules is not None else dict(gm.named_modules())
        #: nodes that drew random numbers (moved the CPU generator) in this eval-mode run;
        #: propagate_shapes lists them in ``gm.meta["random_in_eval"]``
        self.random: list[torch.fx.Node] = []

    def propagate(self, *args):
        return self.run(*args)

    def run_node(self, n):
        # Interpreter.run_node without its per-node context manager (fx's meta
        # preservation for re-tracing, which this never does)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        args, kwargs = _mutable(args), _mutable(kwargs)
        rng = torch.default_generator.get_state()
        if self.shapes_only and n.op not in ("placeholder", "get_attr", "output") and not value_blind(
                n, self._submodule(n.target) if n.op == "call_module" else None, args, kwargs):
            with self._guard:
                out = self._run_counted(n, args, kwargs)
        else:
            out = self._run_counted(n, args, kwargs)
        if not torch.equal(rng, torch.default_generator.get_state()):
            self.random.append(n)
        if type(out) is torch.Tensor:
            n.meta["tensor_meta"] = _tensor_meta(out)
        else:
            found = False

            def tensor_meta(obj):
                nonlocal found
                if isinstance(obj, torch.Tensor):
                    found = True
                    return _tensor_meta(obj)
                return obj

            meta = map_aggregate(out, tensor_meta)
            if found:
                n.meta["tensor_meta"] = meta
        n.meta["type"] = type(out)
        return out

    def call_module(self, target, args, kwargs):
        module = self._submodule(target)
        if self.shapes_only:
            out = shape_only_call(module, args, kwargs)
            if out is not None:
                return out
        return module(*args, **kwargs)

    def _submodule(self, target: str) -> nn.Module:
        # named_modules lists a module shared under two names once: fall back to fx's lookup
        module = self._modules.get(target)
        return module if module is not None else self.fetch_attr(target)

    def _run_counted(self, n, args, kwargs):
        run = getattr(self, n.op)
        if n.op in ("placeholder", "get_attr", "output"):
            return run(n.target, args, kwargs)  # no op runs
        key = None
        if not self.count_all:
            module = self._submodule(n.target) if n.op == "call_module" else None
            formula = conv_flops(self._counter, module, args, kwargs) if type(module) in _CONVS else None
            if formula is not None:
                out = run(n.target, args, kwargs)
                flops = formula(out)
                if flops:
                    self.macs[n.name] = flops // 2
                return out
            key = zero_flop_key(n, module)
            if key is not None and self._zero.get(key):
                return run(n.target, args, kwargs)
        with self._counter:
            out = run(n.target, args, kwargs)
        flops = self._counter.get_total_flops()
        if key is not None:
            self._zero.setdefault(key, not flops)
        if flops:
            self.macs[n.name] = flops // 2
        return out


def _tensor_meta(t: torch.Tensor) -> TensorMetadata:
    """fx's tensor metadata without the memory format (its Python contiguity checks cost
    a tenth of propagation and nothing in dcopt reads it); a plain dense tensor directly."""
    if type(t) is torch.Tensor and t.layout is torch.strided and not t.is_quantized:
        return TensorMetadata(t.shape, t.dtype, t.requires_grad, t.stride(), None, False, {})
    return _extract_tensor_metadata(t, include_contiguity=False)


def _set_training(module, flags: dict[str, bool]):
    """Set training flags by qualified name (``module``: a Module or its named_modules
    as a dict); only flags that differ are written (Module.__setattr__ is slow)."""
    named = module.items() if isinstance(module, dict) else module.named_modules()
    for name, m in named:
        want = flags.get(name, m.training)
        if m.training != want:
            m.training = want


def _hook_kind(hook: Any) -> Optional[str]:
    """What a torch utility's hook is and how to undo it, for the hooks torch itself sets."""
    from torch.nn.utils import prune

    if isinstance(hook, prune.BasePruningMethod):
        return (f"nn.utils.prune (its '{hook._tensor_name}' is recomputed from '{hook._tensor_name}_orig' and "
                f"'{hook._tensor_name}_mask' before every call): make the pruning permanent with "
                f"torch.nn.utils.prune.remove(module, '{hook._tensor_name}') first")
    kind = type(hook).__module__ + "." + type(hook).__qualname__
    if kind == "torch.nn.utils.weight_norm.WeightNorm":
        return "the old nn.utils.weight_norm: fold it with torch.nn.utils.remove_weight_norm(module) first"
    if kind == "torch.nn.utils.spectral_norm.SpectralNorm":
        return "the old nn.utils.spectral_norm: remove it with torch.nn.utils.remove_spectral_norm(module) first"
    return None


def _refuse_hooks(model: nn.Module) -> None:
    """TraceError when a forward hook or pre-hook is set on a module of ``model``, or a
    global one that torch itself did not set (FlopCounterMode's module tracker only
    watches). fx drops the hooks of every module it traces through, so the traced model
    would compute something else than the user's even at full width; a hook on a leaf
    dcopt resizes would see tensors of another width. dcopt never changes the user's
    model, so it does not remove them itself."""
    from torch.nn.modules import module as _m

    hooked: list[str] = []
    kinds: list[str] = []
    for name, m in model.named_modules():
        hooks = list(m._forward_pre_hooks.values()) + list(m._forward_hooks.values())
        if hooks:
            hooked.append(name or "<root>")
            kinds += [f"'{name or '<root>'}' uses {k}" for k in map(_hook_kind, hooks) if k]
    global_hooks = [h for h in list(_m._global_forward_pre_hooks.values()) + list(_m._global_forward_hooks.values())
                    if not (getattr(h, "__module__", None) or "").startswith("torch")]
    if not hooked and not global_hooks:
        return
    where = (f"on module(s) {', '.join(hooked)}" if hooked else "") + \
        (" and " if hooked and global_hooks else "") + \
        ("globally (nn.modules.module.register_module_forward_hook / _pre_hook)" if global_hooks else "")
    suggestion = ("Remove the hooks before handing the model to dcopt (keep the handle that "
                  "register_forward_hook / register_forward_pre_hook returns and call its .remove()); "
                  "dcopt does not change your model, so it does not remove them itself")
    if kinds:
        suggestion = "; ".join(kinds) + ". " + suggestion
    raise TraceError(f"forward hooks are set {where}: torch.fx drops the hooks of the modules it traces "
                     "through, and a hook on a layer dcopt resizes would see tensors of another width",
                     module=hooked[0] if hooked else None, suggestion=suggestion)


def _refuse_backward_hooks(model: nn.Module, only_endless: bool = False) -> None:
    """TraceError when a backward hook is set on a module or a parameter of ``model``, or
    globally. The converted model would train with other gradients than the user's: fx
    drops module hooks as it drops forward hooks, a copy of the model drops tensor hooks,
    and the deprecated ``register_backward_hook`` sends fx's tracing into an endless loop
    inside ``Module._call_impl``. Checked before tracing, for that last reason."""
    from torch.nn.modules import module as _m

    if only_endless:
        old_style = [name or "<root>" for name, m in model.named_modules()
                     if m._backward_hooks and m._is_full_backward_hook is False]
        if old_style:
            raise TraceError(f"module '{old_style[0]}' has a hook from the deprecated register_backward_hook, "
                             "which sends torch.fx's tracing into an endless loop",
                             suggestion="use register_full_backward_hook, or remove the hook first")
        return
    where = [f"module '{name or '<root>'}'" for name, m in model.named_modules()
             if m._backward_hooks or m._backward_pre_hooks]
    where += [f"parameter '{name}'" for name, p in model.named_parameters()
              if p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None)]
    if [h for h in list(_m._global_backward_hooks.values()) + list(_m._global_backward_pre_hooks.values())
            if not (getattr(h, "__module__", None) or "").startswith("torch")]:
        where.append("all modules (nn.modules.module.register_module_full_backward_hook / _pre_hook)")
    if not where:
        return
    raise TraceError(f"backward hooks are set on {', '.join(where)}: the converted model would not run them "
                     "(torch.fx drops module hooks, a copy of the model drops tensor hooks), so it would "
                     "train with other gradients than your model",
                     suggestion="Remove the hooks before handing the model to dcopt (call .remove() on the "
                                "handle register_*_hook returned) and register them on the converted model's "
                                "parameters if training needs them; dcopt does not change your model, so it "
                                "does not remove them itself")


def _deepcopy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, or a TraceError that says which tensor could not be copied
    (torch deep-copies only tensors that are graph leaves: a tensor attribute computed
    from a Parameter, as nn.utils.prune and the old nn.utils.weight_norm leave, is not)."""
    try:
        return copy.deepcopy(model)
    except Exception as exc:
        computed = [f"{name + '.' if name else ''}{k}" for name, m in model.named_modules()
                    for k, v in vars(m).items() if isinstance(v, torch.Tensor) and not v.is_leaf]
        reason = f"{type(exc).__name__}: {_first_line(str(exc))}"
        if computed:
            reason = (f"{', '.join(computed)} is a tensor computed from a Parameter (not a Parameter or "
                      f"buffer of its own), which torch cannot deep-copy ({reason})")
        raise TraceError(f"dcopt cannot copy the model: {reason}",
                         suggestion="nn.utils.prune leaves 'weight' computed from 'weight_orig' and "
                                    "'weight_mask': make it permanent with torch.nn.utils.prune.remove(module, "
                                    "'weight') first; the old nn.utils.weight_norm: remove_weight_norm(module); "
                                    "a tensor you compute in __init__: register it as a buffer or compute it in "
                                    "forward") from exc


def _refuse_converted(model: nn.Module) -> None:
    """A model dcopt has already converted cannot be traced again (its gates read their
    sizes as Python numbers); say so instead of fx's error about a Proxy."""
    from .rewrite import DynamicModel, LazyDynamicModel
    for name, m in model.named_modules():
        if isinstance(m, (DynamicModel, LazyDynamicModel)):
            raise TraceError(f"{'the model' if not name else repr(name)} is a dcopt {type(m).__name__}, already "
                             "converted", suggestion="Pass the original nn.Module to analyze/convert; a "
                             "DynamicModel's analysis is dm.analysis, its sizes dm.sizes(), and dcopt.export(dm) "
                             "gives the plain model")


def trace(model: nn.Module, example_inputs: Optional[Sequence] = None, *, leaf_modules: Iterable[Any] = (),
          concrete_args: Optional[dict] = None, copy_model: bool = True, strict_trace: bool = False,
          lazy_code: bool = False, allow_hooks: bool = False, compare_train: bool = False) -> Traced:
    """Trace ``model`` (a deep copy unless ``copy_model=False``) and, with example inputs,
    attach shapes and MACs to every node.

    Submodules fx cannot trace become opaque leaves (``Traced.opaque``) unless
    ``strict_trace``; a top-level forward fx cannot trace raises :class:`TraceError`.
    ``lazy_code``: the GraphModule's Python code is generated when first needed (for a
    traced module that is only analysed, never).

    The traced graph is functional: in-place ops are rewritten out of place
    (:func:`dcopt.inplace.functionalize`; one it cannot rewrite exactly is a TraceError).
    Forward hooks and pre-hooks on any module (or global ones) are a TraceError: fx drops
    the hooks of the modules it traces through, and a hook on a layer dcopt resizes sees
    tensors of another width. ``allow_hooks=True`` traces anyway (for measuring shapes
    and MACs of the model as it runs, never for conversion).

    Shapes are taken in eval mode under ``no_grad``: BatchNorm must not update running
    statistics of anyone's model, and eval mode makes a batch of one valid.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"dcopt expects a torch.nn.Module, got {type(model).__name__}")
    _refuse_converted(model)
    if not allow_hooks:
        _refuse_hooks(model)
        _refuse_backward_hooks(model)
    else:   # measuring only; but the deprecated backward hook would trace forever
        _refuse_backward_hooks(model, only_endless=True)
    src = _deepcopy(model) if copy_model else model
    # Trace in eval mode: fx bakes `self.training` into the graph as a constant, and the
    # gated model must compute the original's inference function exactly. Training-time
    # randomness belongs in leaf modules (nn.Dropout, StochasticDepth), which keep it.
    flags = {name: m.training for name, m in src.named_modules()}
    missing = sorted(n for n in leaf_modules if isinstance(n, str) and n not in flags)
    if missing:   # a misspelt leaf would otherwise be traced through without a word
        raise TraceError(f"leaf_modules names no submodule of the model: {', '.join(map(repr, missing))} "
                         f"(submodule names are as in model.named_modules(), e.g. 'encoder.rnn')")
    if any(flags.values()):
        src.eval()
    train_branch = None
    grad_sites: list[str] = []
    try:
        with _watching_grad_mode(grad_sites):
            gm, opaque = _symbolic_trace(src, tuple(leaf_modules), concrete_args, strict_trace, lazy_code)
        if compare_train:
            train_branch = _train_branch(src, gm, tuple(leaf_modules) + tuple(o.name for o in opaque),
                                         concrete_args)
    finally:
        _set_training(src, flags)
    _set_training(gm, {name: flags.get(name, src.training) for name, _ in gm.named_modules()})
    changed = functionalize(gm)
    changed = drop_zero_initial_states(gm) or changed   # both passes run
    if changed:
        gm.recompile()
    traced = Traced(gm=gm, example_inputs=tuple(example_inputs) if example_inputs is not None else (), source=src,
                    opaque=opaque, train_branch=train_branch, grad_mode_sites=grad_sites)
    if example_inputs is not None:
        traced.macs = propagate_shapes(gm, traced.example_inputs)
        if restore_dtypes(gm):   # rare: a promoted twin of an in-place op, cast back
            gm.recompile()
            traced.macs = propagate_shapes(gm, traced.example_inputs)
    return traced


def _describe(node: torch.fx.Node, also: Optional[torch.fx.Node] = None) -> str:
    """``'dropout' (call_function) at model.py:12``: a node as the user wrote it."""
    where = source_location(node.stack_trace) or (source_location(also.stack_trace) if also is not None else None)
    what = getattr(node.target, "__name__", None) or str(node.target)
    return f"'{what}' ({node.op}){f' at {where}' if where else ''}"


def _defaulted_none_hint(gm: torch.fx.GraphModule, given: int) -> Optional[str]:
    """The way out when the forward has arguments left at a default of None: fx traced
    them as tensors (``if mask is not None:`` was true while tracing), and the run with
    None fails inside that branch."""
    names = [n.target for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")
             if i >= given and n.args and n.args[0] is None]
    if not names:
        return None
    pinned = ", ".join(f"'{n}': None" for n in names)
    return (f"The forward's {', '.join(names)} defaulted to None, but torch.fx traces every argument as a "
            f"tensor, so a branch such as 'if {names[0]} is not None:' was taken while tracing. Pass "
            f"concrete_args={{{pinned}}} to fix those arguments at None (or pass a tensor for them in the "
            f"example inputs)")


def _train_branch(src: nn.Module, gm: torch.fx.GraphModule, leaves: tuple, concrete_args) -> Optional[str]:
    """Where ``src`` traced in train mode differs from ``gm`` (its eval-mode trace), or None.

    fx bakes ``self.training`` into the graph, and dcopt traces in eval mode: a forward that
    branches on it (auxiliary classifiers in train mode, ``F.dropout(x, p, self.training)``)
    keeps its eval branch in the converted model, in every phase — so the fixed phase would
    not be the user's training. Randomness in leaf modules (``nn.Dropout``, StochasticDepth)
    is unaffected: a leaf is called, not traced. One more trace, compared node by node."""
    src.train()
    try:
        other, _ = _symbolic_trace(src, leaves, concrete_args, True, True)
    except Exception as exc:  # noqa: BLE001 - fx fails in many ways
        return f"the forward cannot be traced in train mode ({type(exc).__name__}: {_first_line(str(exc))})"
    def sig(n):   # what the node computes from what (not its users: they follow the difference)
        return n.op, str(n.target), str(n.args), str(n.kwargs)

    mine, theirs = list(gm.graph.nodes), list(other.graph.nodes)
    for a, b in zip(mine, theirs):
        if sig(a) != sig(b):
            return _describe(b, also=a)
    if len(mine) != len(theirs):
        extra = (theirs or mine)[min(len(mine), len(theirs)) - 1]
        return f"the graphs end differently ({extra.name})"
    return None


def _forget_shapes(gm: torch.fx.GraphModule) -> None:
    """Drop what an abandoned measuring run wrote on the nodes (before the next run)."""
    for node in gm.graph.nodes:
        node.meta.pop("tensor_meta", None)
        node.meta.pop("type", None)


def _propagated(gm: torch.fx.GraphModule, example_inputs: tuple, make: Callable) -> "_MeasuringShapeProp":
    """One measuring run under ``no_grad``, on copies of the inputs (an in-place op on an
    input must leave neither the user's tensors nor a fallback run other values). torch's FLOP counter
    asserts when a view of a parameter that requires grad (a learned query
    ``self.query.expand(B, -1, -1)``, a sliced positional table) is passed into a
    submodule under ``no_grad``; such a run is made again with the parameters not
    requiring grad (:func:`~dcopt.counting.parameters_without_grad`). Not every run:
    the nodes' metadata then says ``requires_grad=False`` for parameters, unlike fx's."""
    prop = make()
    try:
        with torch.no_grad():
            prop.propagate(*fresh_copies(example_inputs))
        return prop
    except AssertionError:
        pass
    _forget_shapes(gm)
    prop = make()
    with torch.no_grad(), parameters_without_grad(gm):
        prop.propagate(*fresh_copies(example_inputs))
    return prop


def propagate_shapes(gm: torch.fx.GraphModule, example_inputs: tuple, *, count_all: bool = False,
                     shapes_only: bool = True) -> dict[str, int]:
    """Run ShapeProp on the example inputs and return the MACs of each node.

    ``shapes_only`` (default): where :func:`~dcopt.shape_only.shapes_only_safe` allows it,
    convolutions and linear layers run on meta tensors (shapes without arithmetic, see
    :mod:`dcopt.shape_only`); the run falls back to real tensors the moment a value could
    reach a shape. ``count_all``: real tensors and every node under the counter (the
    reference the fast paths are tested against). ``gm.meta['shape_propagation']`` says
    which run it was, and why not the fast one."""
    modules = dict(gm.named_modules())
    flags = {name: m.training for name, m in modules.items()}
    if any(flags.values()):
        gm.eval()
    why_real = "count_all" if count_all else "shapes_only=False" if not shapes_only else None
    try:
        why_real = why_real or shapes_only_safe(gm, modules)
        if why_real is None:
            try:
                prop = _propagated(gm, example_inputs, lambda: _MeasuringShapeProp(gm, modules=modules,
                                                                                  shapes_only=True))
                gm.meta["shape_propagation"] = "shapes only"
                gm.meta["random_in_eval"] = [_describe(n) for n in prop.random]
                return prop.macs
            except Exception as exc:
                # a value might have reached a shape, or zeros upset an op: forget this
                # run's metadata and do it for real (which raises the real error, if any)
                why_real = f"abandoned the shapes-only run: {type(exc).__name__}: {_first_line(str(exc))}"
                _forget_shapes(gm)
        gm.meta["shape_propagation"] = f"real tensors ({why_real})"
        try:
            prop = _propagated(gm, example_inputs, lambda: _MeasuringShapeProp(gm, count_all=count_all,
                                                                              modules=modules))
        except Exception as exc:
            raise TraceError(f"running the model on the example inputs failed: {type(exc).__name__}: {exc}",
                             location=_user_frame(sys.exc_info()[2]),
                             suggestion=_defaulted_none_hint(gm, len(example_inputs))) from exc
        gm.meta["random_in_eval"] = [_describe(n) for n in prop.random]
        return prop.macs
    finally:
        _set_training(modules, flags)
