"""The reverse pass: slice every group to its kept size and emit a plain model.

Works on a copy of the gated graph: gates and RNN masks are removed, each planned
parameter/buffer keeps the positions its group keeps, module attributes follow, and
literal widths in the graph (``view(B, 512*7*7)``, a slice on the feature dim) are
rewritten. The result is checked by numbers against the eval-mode DynamicModel.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.fx
from torch import nn

from .errors import ExportError
from .fold import fold_batchnorm as fold
from .gates import FeatureGate, FunctionalNorm, GatedRNN, MaskedNorm, round_size
from .numcheck import agreement, float64_copy, fresh_copies, to_float64
from .plan import Plan, keep_index, keep_mask, size_limits
from .rewrite import GATES, SIZES, DynamicModel, _lookup, as_dynamic_model
from .trace import _first_line

__all__ = ["export", "slice_graph_module"]


def _resolve_sizes(dm: DynamicModel, sizes: Optional[dict]) -> list[int]:
    kept = dm.kept_sizes()
    if sizes:
        names = dm.group_names
        for name, n in sizes.items():
            dm.check_size(name, n)
            g = dm.plan.groups[names.index(name)]
            kept[names.index(name)] = round_size(int(n), g.width, dm.config.round_to)
    return kept


def _strip_dcopt(gm: torch.fx.GraphModule, sizes: Optional[list[int]] = None) -> None:
    """Remove gates, size parameters and the RNN and norm wrappers from a copy of the gated
    graph; a functional norm becomes torch's call again, over the features ``sizes`` keep
    (when given)."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), FeatureGate):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op == "call_module" and isinstance(mod := gm.get_submodule(node.target), FunctionalNorm):
            # torch's F.layer_norm / F.rms_norm again, with the kept count as normalized_shape:
            # written here from the module's positions, not by the plan's rewrite, because an
            # unpickled GraphModule is traced again from its code, which renames this node
            node.op, node.target = "call_function", mod.fn
            node.args, node.kwargs = mod.call_args(*node.args[:3], (mod.kept_count(sizes),) if sizes else None)
    for node in list(graph.nodes):
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), GatedRNN):
            node.args = node.args[1:]
        elif node.op == "call_module" and isinstance(gm.get_submodule(node.target), MaskedNorm):
            node.args = node.args[:1]
    for node in list(graph.nodes):
        if node.op == "get_attr" and str(node.target).startswith(SIZES + "."):
            graph.erase_node(node)
    for name, mod in list(gm.named_modules()):
        if isinstance(mod, MaskedNorm):   # a read of the norm's weight, retargeted by build_gated, goes back
            inner = f"{name}.norm." if name else "norm."
            for node in graph.nodes:
                if node.op == "get_attr" and str(node.target).startswith(inner):
                    node.target = f"{name}.{node.target[len(inner):]}" if name else node.target[len(inner):]
        if isinstance(mod, (GatedRNN, MaskedNorm)):
            parent, _, attr = name.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, attr, mod.inner)
    for attr in (GATES, SIZES):
        if hasattr(gm, attr):
            delattr(gm, attr)


def _owner(gm: nn.Module, qual: str):
    mod, _, name = qual.rpartition(".")
    return (gm.get_submodule(mod) if mod else gm), name


def _slice_tensors(gm: nn.Module, plan: Plan, limits: torch.Tensor) -> None:
    for qual, dims in plan.params.items():
        owner, name = _owner(gm, qual)
        t = getattr(owner, name)
        new = t.detach()
        for d, pos in enumerate(dims):
            if pos is not None:
                new = new.index_select(d, keep_index(pos, limits).to(new.device))
        new = new.contiguous().clone()
        if isinstance(t, nn.Parameter):
            setattr(owner, name, nn.Parameter(new, requires_grad=t.requires_grad))
        else:
            owner._buffers[name] = new
    for target, attrs in plan.attrs.items():
        module = gm.get_submodule(target)
        for attr, (kind, pos) in attrs.items():
            n = int(keep_mask(pos, limits).sum())
            setattr(module, attr, (n,) if kind == "shape" else n)
    for module in gm.modules():
        if isinstance(module, nn.RNNBase):
            module._init_flat_weights()


def _rewrite_nodes(gm: torch.fx.GraphModule, plan: Plan, limits: torch.Tensor) -> None:
    nodes = {n.name: n for n in gm.graph.nodes}
    for name, spec in plan.rewrites.items():
        node = nodes[name]
        if spec["kind"] == "shape_literal":
            _rewrite_shape(node, spec, limits)
        elif spec["kind"] == "slice":
            _rewrite_slice(node, spec, limits)
        elif spec["kind"] == "split":
            _rewrite_split(gm.graph, node, spec, limits)
        elif spec["kind"] == "set_kwarg":
            node.kwargs = {**node.kwargs, spec["name"]: spec["value"]}
        else:
            raise ExportError(f"unknown rewrite {spec['kind']!r}", node=name)


def _rewrite_shape(node: torch.fx.Node, spec: dict, limits: torch.Tensor) -> None:
    width = int(keep_mask(spec["pos"], limits).sum())
    j = spec["out_dim"] - spec.get("offset", 0)
    if "kwarg" in spec:
        kwargs = dict(node.kwargs)
        shape = list(kwargs[spec["kwarg"]])
        if isinstance(shape[j], int) and shape[j] != -1:
            shape[j] = width
        kwargs[spec["kwarg"]] = tuple(shape)
        node.kwargs = kwargs
        return
    args = list(node.args)
    if spec["nested"]:
        shape = list(args[spec["arg"]])
        if isinstance(shape[j], int) and shape[j] != -1:
            shape[j] = width
        args[spec["arg"]] = tuple(shape)
    else:
        k = spec["arg"] + j
        if isinstance(args[k], int) and args[k] != -1:
            args[k] = width
    node.args = tuple(args)


def _rewrite_split(graph: torch.fx.Graph, node: torch.fx.Node, spec: dict, limits: torch.Tensor) -> None:
    """A split of the feature dim (chunk, split, tensor_split) becomes ``x.split(sizes, dim)``
    with each part's kept size: the parts of a refined group keep their own sizes, which
    ``chunk(n)`` of the sliced tensor would not give."""
    keep = keep_mask(spec["pos"], limits).long()
    sizes, lo = [], 0
    for s in spec["sizes"]:
        sizes.append(int(keep[lo:lo + s].sum()))
        lo += s
    x = node.args[0] if node.args else next(v for k, v in node.kwargs.items() if k in ("input", "tensor", "self"))
    with graph.inserting_before(node):
        new = graph.call_method("split", (x, sizes, spec["dim"]))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def _rewrite_slice(node: torch.fx.Node, spec: dict, limits: torch.Tensor) -> None:
    keep = keep_mask(spec["in_pos"], limits)
    rank = torch.cumsum(keep.long(), 0) - 1
    sel = spec["sel"]
    new_idx = rank[sel[keep[sel]]]
    if new_idx.numel() and torch.equal(new_idx, torch.arange(int(new_idx[0]), int(new_idx[0]) + new_idx.numel())):
        item = slice(int(new_idx[0]), int(new_idx[0]) + new_idx.numel())
    elif new_idx.numel() == 0:
        item = slice(0, 0)
    else:
        item = new_idx.tolist()
    index = node.args[1]
    if spec["item"] is None:
        node.args = (node.args[0], item)
    else:
        items = list(index if isinstance(index, tuple) else (index,))
        # the recorded position counts expanded items; map it back onto the written tuple
        items = _expand_index(items, spec["n_items"])
        items[spec["item"]] = item
        node.args = (node.args[0], tuple(items))


def _expand_index(items: list, n_items: int) -> list:
    if Ellipsis not in items:
        return items + [slice(None)] * (n_items - len(items))
    i = items.index(Ellipsis)
    fill = n_items - (len(items) - 1)
    return items[:i] + [slice(None)] * fill + items[i + 1:]


def slice_graph_module(gm: torch.fx.GraphModule, plan: Plan, sizes: list[int]) -> torch.fx.GraphModule:
    """Copy ``gm`` (a gated graph) and return it sliced to ``sizes`` as plain PyTorch."""
    # The tensors about to be sliced are not copied first (every one of them is replaced
    # by a fresh sliced tensor below): a full deepcopy made export's peak memory one more
    # copy of the model.
    memo: dict = {}
    for qual in plan.params:
        t = _lookup(gm, qual)
        memo[id(t)] = t
    gm = copy.deepcopy(gm, memo)
    _strip_dcopt(gm, sizes)
    limits = size_limits(sizes)
    _slice_tensors(gm, plan, limits)
    _rewrite_nodes(gm, plan, limits)
    # no dead-code elimination: a call whose result the forward drops (``_ = self.aux(x)``)
    # still runs in the user's model, and the analysis counts its MACs; an export that
    # left it out would cost less than predicted (and skip its side effects, such as a
    # BatchNorm's running statistics in training)
    gm.graph.lint()
    gm.recompile()
    return gm


def _as_user_class(dm: DynamicModel, sliced: torch.fx.GraphModule) -> Optional[nn.Module]:
    """The user's own class with resized submodules, when nothing in its forward needed
    rewriting (a functional norm's ``normalized_shape`` is a number in the forward, too)."""
    if dm.plan.rewrites or dm.plan.fnorms or dm.config.concrete_args:
        return None
    touched_modules = set(dm.plan.attrs) | {q.rpartition(".")[0] for q in dm.plan.params}
    if "" in touched_modules:
        return None
    # Copy the user's module tree, but take every leaf module that ``sliced`` already holds
    # (a fresh copy, resized or not) instead of copying the template's: a plain deepcopy
    # made export's peak memory one more copy of the full model. Leaves of the same type
    # under the same name are the same layer (the GraphModule was built from this tree).
    memo: dict = {}
    sliced_modules = dict(sliced.named_modules())
    for name, mod in dm._template.named_modules():
        src = sliced_modules.get(name)
        if name and src is not None and type(src) is type(mod) and not list(mod.children()) \
                and not list(src.children()):
            memo[id(mod)] = src
    # a tensor also held under another name (``self.W = self.lin.weight``, tied weights)
    # must stay that very tensor: the copy would untie it from the leaf taken above
    taken = {name for name, mod in dm._template.named_modules() if id(mod) in memo}
    for tensors in (dm._template.named_parameters(remove_duplicate=False),
                    dm._template.named_buffers(remove_duplicate=False)):
        for name, t in tensors:
            owner = name.rpartition(".")[0]
            if owner in taken and id(t) not in memo:
                memo[id(t)] = getattr(sliced_modules[owner], name.rpartition(".")[2])
    template = copy.deepcopy(dm._template, memo)
    for target in sorted(touched_modules):
        src = sliced.get_submodule(target) if target else sliced
        if target == "":
            return None
        parent, _, attr = target.rpartition(".")
        holder = template.get_submodule(parent) if parent else template
        current = getattr(holder, attr)
        if type(current) is type(src) and not list(src.children()):
            setattr(holder, attr, src)
        else:  # a non-leaf module owning a sliced parameter: copy tensors over
            for name, t in list(src.named_parameters(recurse=False)) + list(src.named_buffers(recurse=False)):
                if isinstance(t, nn.Parameter):
                    setattr(current, name, nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad))
                else:
                    current._buffers[name] = t.clone()
    return template


#: how far folding BatchNorm may move the outputs (relative to their scale): rounding only;
#: the largest seen over the 58 torchvision models with BatchNorm is 3.6e-6 (benchmarks/zoo.py)
FOLD_TOL = 1e-4


def export(dynamic_model: DynamicModel, sizes: Optional[dict] = None, *, verify: bool = True,
           tol: float = 1e-5, keep_class: bool = True, fold_batchnorm: bool = False) -> nn.Module:
    """Emit the smaller plain-PyTorch model: each group keeps its first ⌈s⌉ features
    (or the integer ``sizes`` given by group name). With ``convert(..., round_to=8)`` the
    kept widths — also explicit ``sizes`` — are rounded up to multiples of 8 (at most N),
    the same sizes the eval-mode DynamicModel uses.

    The result contains only torch modules. When the user's class can be kept (nothing
    in its forward needed rewriting, and it computes the same numbers) it is an instance
    of that class with resized submodules; otherwise a ``torch.fx.GraphModule``.
    The result is in ``dm``'s train/eval mode (after :func:`dcopt.fit`, which leaves the
    model in train mode, that is train mode: call ``.eval()`` before inference, or its
    BatchNorms use and update batch statistics); with ``fold_batchnorm=True`` it is in eval
    mode, whether or not a BatchNorm could be folded.
    With ``verify`` (default) the result is compared with the eval-mode DynamicModel on
    the example inputs, and an :class:`~dcopt.ExportError` is raised if they differ by
    more than ``tol`` relative to the output's scale — after a float32 difference has been
    recomputed in float64, so that an output made of rounding noise is not reported as a
    wrong export (:mod:`dcopt.numcheck`).

    ``fold_batchnorm=True`` exports for inference: each BatchNorm right after a
    convolution or Linear is folded into its weights (``dcopt.fold``: only where that is
    exact), so the model runs faster but has no BatchNorm left to fine-tune. When it
    folded any, the result is a ``torch.fx.GraphModule`` in eval mode. For image models
    also run it in channels_last (``small.to(memory_format=torch.channels_last)`` and the
    input alike): benchmarks/results/speed.md measures both.

    Example::

        small = dcopt.export(dm)
        torch.save(small.state_dict(), "small.pt")
    """
    dm = as_dynamic_model(dynamic_model, "export")
    kept = _resolve_sizes(dm, sizes)
    sliced = slice_graph_module(dm.gm, dm.plan, kept)
    sliced.train(dm.training)
    result: nn.Module = sliced
    folded: list = []

    def float64_pair(model):   # numcheck's second opinion: the gated model and ``model``, both in float64
        return lambda: (_reference_output_float64(dm, kept, sizes), _run_float64(model, dm.example_inputs))

    if verify or keep_class:   # the unfolded export's outputs: checked here, and the fold below against them
        with torch.no_grad():
            sliced.eval()
            try:
                got = sliced(*fresh_copies(dm.example_inputs))
            except Exception as exc:   # the analysis let through a slice the ops cannot take
                raise ExportError(f"the exported model fails on the example inputs ({type(exc).__name__}: "
                                  f"{_first_line(str(exc))}); please report this model: it is a dcopt bug") from exc
        reference = _reference_output(dm, kept, sizes)
        if verify:
            check = agreement(reference, got, tol, float64_pair(sliced))
            if not check.ok:
                random = getattr(dm, "_random_in_eval", ())
                raise ExportError(f"exported model differs from the gated model ({check.describe(tol)}); " + (
                    f"the model draws random numbers in eval mode ({', '.join(random)}), so no two runs agree: "
                    "make that depend on self.training, or export with verify=False" if random else
                    "please report this model: it is a dcopt bug"))
    if fold_batchnorm:
        sliced.eval()
        folded = fold(sliced, fresh_copies(dm.example_inputs))
        if folded and verify:
            # checked apart from the slicing, against the unfolded model: folding changes
            # the rounding (w·γ/σ instead of (w·x)·γ/σ), by up to a few 1e-6 on deep nets.
            # The float64 second opinion compares with the gated model (the unfolded
            # export is gone by then; it equals the gated model, checked above).
            with torch.no_grad():
                check = agreement(got, sliced(*fresh_copies(dm.example_inputs)), FOLD_TOL, float64_pair(sliced))
            if not check.ok:
                raise ExportError(f"folding BatchNorm changed the exported model's outputs "
                                  f"({check.describe(FOLD_TOL)}); please report this model: it is a dcopt bug")
        keep_class = keep_class and not folded
    # a forward that branches on self.training: the user's class would run the other branch
    keep_class = keep_class and getattr(dm, "_train_branch", None) is None
    if keep_class:
        user = _as_user_class(dm, sliced)
        if user is not None:
            user.eval()
            try:
                with torch.no_grad():
                    same = agreement(reference, user(*fresh_copies(dm.example_inputs)), tol, float64_pair(user)).ok
            except Exception:
                same = False
            if same:
                result = user
    result.train(dm.training and not fold_batchnorm)   # an inference export, folded or not
    return result


@torch.no_grad()
def _reference_output(dm: DynamicModel, kept: list[int], sizes: Optional[dict]):
    was_training = dm.training
    saved = [k.detach().clone() for k in dm._kappas()]
    try:
        if sizes:
            dm.set_sizes({g.name: n for g, n in zip(dm.plan.groups, kept)})
        dm.eval()
        return dm(*fresh_copies(dm.example_inputs))
    finally:
        for k, v in zip(dm._kappas(), saved):
            k.copy_(v)
        dm.train(was_training)


def _float64_dm(dm: DynamicModel) -> DynamicModel:
    """A float64 copy of ``dm`` with float64 example inputs (numcheck's second opinion);
    the user's template and the analysis are shared, not copied."""
    dm64 = float64_copy(dm, share=(dm._template, dm.analysis))
    object.__setattr__(dm64, "example_inputs", to_float64(dm.example_inputs))
    return dm64


def _reference_output_float64(dm: DynamicModel, kept: list[int], sizes: Optional[dict]):
    """:func:`_reference_output` computed by a float64 copy of ``dm``."""
    return _reference_output(_float64_dm(dm), kept, sizes)


def _run_float64(model: nn.Module, inputs: tuple):
    """``model``'s eval-mode outputs, computed by a float64 copy of it."""
    return float64_copy(model).eval()(*to_float64(fresh_copies(inputs)))
