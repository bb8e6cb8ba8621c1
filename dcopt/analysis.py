"""The analysis pass: follow every candidate group's feature dimension through the graph.

One walk over the fx nodes in order. Each node's rule receives the feature maps of its
inputs and returns the map of its output, declaring on the way what the op means:
a new group (DCL), a consumer to gate (ACL), parameters to slice, couplings, or a
rejection. Afterwards union-find settles which groups survive, and the result is both
a person-readable :class:`Analysis` and a machine :class:`~dcopt.plan.Plan`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import networkx as nx
import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import TensorMetadata

from .errors import source_location
from .fmap import FIXED, FMap, GroupTable, Positions
from .plan import GateSpec, GroupSpec, MacTerm, Plan
from .rules import REGISTRY
from .rules.common import widths_in
from .rules.registry import RuleRegistry
from .trace import OpaqueLeaf, Traced, trace

__all__ = ["Analysis", "Group", "Rejection", "analyze", "run_analysis", "ParamRef"]

DCL, ACL, FCL = "DCL", "ACL", "FCL"


@dataclass(frozen=True)
class ParamRef:
    """Value of a ``get_attr`` node: an untracked tensor that export may slice. Also of
    a basic slice of one (``self.pe[:T]``): ``sliced`` names the parameter's dims the view
    does not hold whole (their entries cannot follow a group)."""
    target: str
    sliced: frozenset = frozenset()


@dataclass
class Rejection:
    """Why a group must keep its width. ``kind`` is ``"unsupported"`` when dcopt could not
    prove a rewrite exact, ``"fixed"`` when the width is pinned by the model's inputs or
    outputs (expected, not a problem)."""
    node: str
    op: str
    reason: str
    location: Optional[str]
    kind: str = "unsupported"
    group: str = ""

    def to_dict(self) -> dict:
        return dict(node=self.node, op=self.op, reason=self.reason, location=self.location,
                    kind=self.kind, group=self.group)


@dataclass
class Group:
    name: str
    width: int
    status: str                     # "dynamic" | "fixed" | "rejected"
    producers: list[str]
    consumers: list[str]
    members: list[str]
    macs_share: float
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(name=self.name, width=self.width, status=self.status, producers=self.producers,
                    consumers=self.consumers, members=self.members, macs_share=self.macs_share,
                    reasons=self.reasons)


def _op_name(node: torch.fx.Node, module: Optional[nn.Module]) -> str:
    if node.op == "call_module":
        return type(module).__name__
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return node.op


def _inside(node: torch.fx.Node) -> str:
    """`` in module 'enc.conv' (WSConv2d)`` for an op fx traced inside a submodule's
    forward: a subclass of a known layer that overrides its computation is traced through,
    and "no rule for conv2d" alone would not say which of the user's layers it was."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, cls = list(stack.values())[-1]
    name = getattr(cls, "__name__", None) or str(cls).rsplit(".", 1)[-1]
    return f" in module {path!r} ({name})"


class Ctx:
    """What a rule sees of the analysis: its node, the maps of its inputs, and verbs."""

    def __init__(self, walker: "_Walker", node: torch.fx.Node):
        self._w = walker
        self.node = node
        self.module: Optional[nn.Module] = (walker.modules[node.target] if node.op == "call_module" else None)
        self.target = node.target if node.op == "call_module" else None

    # -- inputs ---------------------------------------------------------------------
    def arg(self, index: int, name: Optional[str] = None, default: Any = None) -> Any:
        if index < len(self.node.args):
            return self.node.args[index]
        if name is not None and name in self.node.kwargs:
            return self.node.kwargs[name]
        if name == "dim" and "axis" in self.node.kwargs:   # torch's numpy-style alias
            return self.node.kwargs["axis"]
        return default

    def value(self, a: Any) -> Any:
        if isinstance(a, torch.fx.Node):
            return self._w.values.get(a.name)
        return None

    def fmap(self, a: Any) -> Optional[FMap]:
        v = self.value(a)
        return v if isinstance(v, FMap) else None

    def shape(self, a: Any) -> Optional[tuple]:
        if isinstance(a, torch.fx.Node):
            return _meta_shape(a.meta.get("tensor_meta"))
        if isinstance(a, torch.Tensor):
            return tuple(a.shape)
        return None

    @property
    def out_shape(self) -> Optional[tuple]:
        return _meta_shape(self.node.meta.get("tensor_meta"))

    def tensor_args(self) -> list[torch.fx.Node]:
        out: list[torch.fx.Node] = []
        torch.fx.node.map_arg((self.node.args, self.node.kwargs), lambda n: out.append(n) or n)
        return [n for n in out if self.shape(n) is not None]

    def tracked_args(self) -> list[tuple[torch.fx.Node, FMap]]:
        out: list[torch.fx.Node] = []
        torch.fx.node.map_arg((self.node.args, self.node.kwargs), lambda n: out.append(n) or n)
        return [(n, self.fmap(n)) for n in out if self.fmap(n) is not None]

    # -- verbs ----------------------------------------------------------------------
    def new_group(self, width: int, key: Optional[str] = None) -> int:
        """A fresh candidate group produced here (one per module, even if called twice)."""
        key = key or (self.target if self.target is not None else self.node.name)
        gid = self._w.groups.new(width, key, self.target or self.node.name)
        self._w.produced.setdefault(self.node.name, set()).add(gid)
        return gid

    def reject(self, what: Any, reason: str, kind: str = "unsupported") -> None:
        """Keep the groups in ``what`` (FMap, Positions, gid or iterable of those) fixed."""
        for gid in _gids(what):
            self._w.reject(gid, self.node, reason, kind)

    def split_features(self, pos: Positions, sizes: Sequence[int], what: str) -> Optional[list[Positions]]:
        """The positions of each part when the feature dim holding ``pos`` is cut into
        consecutive parts of ``sizes`` (chunk, split, GLU's halves); None after rejecting.

        A cut inside one whole group (a layer's output split into gates, GLU's halves)
        refines the group: each part becomes a group of its own, which keeps its first
        channels and is coupled by later ops as usual. Where ``pos`` holds several groups
        (a cat) or anything else, every cut must fall between whole pieces, and every
        tracked piece must be a whole group in order: a cut inside one of several groups,
        or parts of features flattened with another dim, are rejected, not guessed.
        The export cuts the kept features at the kept sizes of the parts (a rule that
        calls this must record that, or show the parts keep equal sizes)."""
        gt = self._w.groups
        if sum(sizes) != len(pos) or any(s < 0 for s in sizes):
            self.reject(pos, f"{what} cuts {len(pos)} features into parts of {list(sizes)}, which dcopt cannot read")
            return None
        offsets = [0]
        for s in sizes:
            offsets.append(offsets[-1] + s)
        cuts = offsets[1:-1]
        why = _unsplittable(pos)
        if why is not None:
            self.reject(pos, f"{what} splits the feature dimension into parts of {list(sizes)}, but {why}; "
                             "the features keep their width")
            return None
        single = _whole_group_of(pos, gt)
        if single is not None:
            gt.refine(single, cuts)
        res = gt.resolve(pos)
        why = _not_whole_pieces(res, gt)
        if why is None:
            inside = [c for c in cuts if 0 < c < len(res) and int(res.gid[c]) >= 0 and int(res.ch[c]) != 0]
            if inside:
                why = (f"the cut at feature {inside[0]} falls inside one of the groups it holds (channel "
                       f"{int(res.ch[inside[0]])}), and they are not one group: a cut may refine a single "
                       "group, or fall between groups")
        if why is not None:
            self.reject(pos, f"{what} splits the feature dimension into parts of {list(sizes)}, but {why}; "
                             "the features keep their width")
            return None
        parts = []
        for lo, hi in zip(offsets, offsets[1:]):
            part = res[lo:hi]
            g = _whole_group_of(part, gt)
            if g is not None:
                part = Positions.group(g, hi - lo)     # a whole piece: the common, cheap case
            parts.append(part)
        return parts

    def unify(self, maps: Sequence[Positions], reason_where: str = "") -> Optional[Positions]:
        """Declare that these positions hold the same channels (residual add, SE multiply...).

        Positions tracked by different groups couple them; a tracked position meeting a
        fixed one, or two different channels meeting, keeps the groups fixed.
        """
        maps = [m for m in maps if m is not None]
        if not maps:
            return None
        first = maps[0]
        for other in maps[1:]:
            if len(other) != len(first):
                self.reject([first, other], f"combines feature maps of different lengths ({len(first)} vs {len(other)})")
                continue
            a, b = first, other
            if a.whole_group is None or b.whole_group is None:
                # channels of a refined group are compared as the pieces they are now
                a, b = self._w.groups.resolve(a), self._w.groups.resolve(b)
            if a.whole_group is not None and b.whole_group is not None:
                # the common case (a residual add of two layers' outputs) without tensor work
                why = self._w.groups.union(a.whole_group, b.whole_group)
                if why:
                    self.reject([a.whole_group, b.whole_group], why)
                continue
            if self._w.groups.refined():
                a, b = _align_pieces(self._w.groups, a, b)
            both = (a.gid >= 0) & (b.gid >= 0)
            one = (a.gid >= 0) ^ (b.gid >= 0)
            if one.any():
                lone = Positions(torch.where(a.gid >= 0, a.gid, b.gid)[one], a.ch[one])
                self.reject(lone, "meets a fixed-width tensor here" + reason_where, kind="fixed")
            if both.any():
                ga, gb, ca, cb = a.gid[both], b.gid[both], a.ch[both], b.ch[both]
                bad = ca != cb
                if bad.any():
                    self.reject(list(set(ga[bad].tolist()) | set(gb[bad].tolist())),
                                "combines different channels of its inputs (not aligned)")
                pairs = set(zip(ga[~bad].tolist(), gb[~bad].tolist()))
                for x, y in pairs:
                    why = self._w.groups.union(x, y)
                    if why:
                        self.reject([x, y], why)
            if first.is_fixed():
                first = other
        return first

    def plan_param(self, name: str, dims: tuple, *, absolute: bool = False) -> None:
        """Slice parameter/buffer ``name`` (of this module unless ``absolute``) along the
        dims whose entry is a Positions; None dims keep their size."""
        qual = name if absolute else f"{self.target}.{name}"
        self._w.plan_param(qual, dims, self.node)

    def plan_attr(self, attr: str, pos: Positions, kind: str = "width") -> None:
        """After slicing, set module attribute ``attr`` to the number of kept positions."""
        # a module inside an opaque block keeps its width
        if self.module is not None and id(self.module) in self._w.opaque_modules:
            self.reject(pos, f"module {self.target} is also used inside an opaque block; it keeps its width")
            return
        self._w.attrs.setdefault(self.target, {})[attr] = (kind, pos)

    def gate(self, a: torch.fx.Node) -> None:
        """This node mixes the feature dim of input ``a``: zero removed features before it.
        Only floating tensors can carry the optimize phase's noise (σ·ν on the boundary
        feature): integer or bool features keep their width."""
        fm = self.fmap(a)
        if fm is not None:
            meta = a.meta.get("tensor_meta") if isinstance(a, torch.fx.Node) else None
            dtype = getattr(meta, "dtype", None)
            if dtype is not None and not (dtype.is_floating_point or dtype.is_complex):
                self.reject(fm, f"{_op_name(self.node, self.module)} mixes {dtype} features, which cannot carry "
                                "the size noise")
                return
            self._w.gates.setdefault(a.name, []).append(self.node.name)
            self._w.consumed.setdefault(self.node.name, set()).update(fm.pos.gids())

    def layer_rule(self, qualname: str):
        """The rule of the user's submodule ``qualname`` as a layer (None: a plain
        container). Read from the user's model: fx keeps a layer the forward never calls
        only as a bare holder of the tensors it reads (``self.lin.weight``)."""
        source = self._w.traced.source
        module = dict(source.named_modules()).get(qualname) if source is not None else None
        module = module if module is not None else self._w.modules.get(qualname)
        return self._w.registry.for_module(module) if module is not None else None

    def reads_only_metadata(self, a: Any) -> None:
        """This node reads only the dtype, device or shape of input ``a`` (``type_as``,
        ``new_zeros``): its features go nowhere here (see ``_Walker.account``)."""
        self._w.shape_read.setdefault(self.node.name, set()).update(_gids(_values_in(self.value(a))))

    def consumes(self, fm: Optional[FMap]) -> None:
        """Mark this node's width as following ``fm`` (per-channel op, for roles)."""
        if fm is not None:
            self._w.consumed.setdefault(self.node.name, set()).update(fm.pos.gids())

    def macs(self, params: Sequence[str] = (), coef: Optional[float] = None,
             extra: Sequence[Positions] = (), vanish_at_one: Sequence[int] = ()) -> None:
        """This node's MACs are ``coef * sum(numel(p) for p in params) * prod(width(e) for e in extra)``
        at any sizes, or 0 where an ``extra[i]`` with ``i`` in ``vanish_at_one`` keeps one
        position (see :class:`MacTerm`); ``coef`` defaults to what the counter measured at full size."""
        quals = [f"{self.target}.{p}" for p in params]
        self._w.mac_terms[self.node.name] = (coef, quals, list(extra), list(vanish_at_one))

    def rewrite(self, spec: dict) -> None:
        """Export must edit this node's arguments (a literal width, a slice)."""
        self._w.rewrites[self.node.name] = spec

    def rnn_hidden(self, pos: Positions) -> None:
        """This RNN module's hidden units are a group: remove them inside the recurrence."""
        self._w.rnns[self.target] = pos

    def masked_norm(self, pos: Positions) -> bool:
        """This norm module normalises over features ``pos``: the gated model takes its
        statistics over the kept ones only (:class:`~dcopt.gates.MaskedNorm`). A module
        called on two tensors must see the same features in both (coupled); False when
        they cannot be (rejected)."""
        seen = self._w.norms.get(self.target)
        if seen is not None and seen is not pos:
            pos = self.unify([seen, pos], f" ({self.target} normalises two tensors)")
            if pos is None:
                return False
        self._w.norms[self.target] = pos
        return True

    def masked_function_norm(self, pos: Positions) -> None:
        """This ``F.layer_norm`` / ``F.rms_norm`` call normalises over features ``pos``:
        in the gated graph it takes its statistics over the kept ones only
        (:class:`~dcopt.gates.FunctionalNorm`), and export writes the kept count into
        its ``normalized_shape``."""
        self._w.fnorms[self.node.name] = pos


def _run_starts(p: Positions) -> torch.Tensor:
    """Where a run of consecutive channels of one group begins (or a position is fixed)."""
    prev_gid = torch.cat([torch.tensor([-2]), p.gid[:-1]])
    prev_ch = torch.cat([torch.tensor([-2]), p.ch[:-1]])
    return (p.gid < 0) | (p.gid != prev_gid) | (p.ch != prev_ch + 1)


def _align_pieces(gt: GroupTable, a: Positions, b: Positions) -> tuple[Positions, Positions]:
    """Cut the pieces of ``a`` and ``b`` (resolved) where the other side's runs begin, until
    both sides' runs begin at the same places. Why: after a split, two tensors meeting
    elementwise may hold the same channels cut differently (``h.split([3, 5])`` on one
    side, GLU's halves of ``h`` on the other); coupled position by position, pieces of
    different widths would meet, and whether the group stayed learnable would depend on
    the order the forward wrote the two. Cutting is always exact (each piece keeps its
    own first channels); each round adds a cut, so this ends."""
    for _ in range(len(a) + 1):
        starts = _run_starts(a) | _run_starts(b)
        cuts = {(int(p.gid[i]), int(p.ch[i])) for p in (a, b)
                for i in torch.nonzero(starts & ~_run_starts(p) & (a.gid >= 0) & (b.gid >= 0)).flatten().tolist()}
        if not cuts:
            break
        for g, c in cuts:
            gt.refine(g, [c])
        a, b = gt.resolve(a), gt.resolve(b)
    return a, b


def _whole_group_of(pos: Positions, gt: GroupTable) -> Optional[int]:
    """The group ``pos`` is, whole and in order (channels 0..N-1 of one group), else None."""
    if pos.whole_group is not None:
        return pos.whole_group
    n = len(pos)
    if n == 0 or int(pos.gid[0]) < 0:
        return None
    g = int(pos.gid[0])
    if gt.width[gt.find(g)] != n or not bool((pos.gid == g).all()) or not torch.equal(pos.ch, torch.arange(n)):
        return None
    return g


def _unsplittable(pos: Positions) -> Optional[str]:
    """Why cutting ``pos`` into parts of literal sizes cannot follow the kept features at
    every input shape; None when it can. The parts' sizes are written into the export as
    numbers: they stay right only where the dim holds group features alone, each once
    (group widths do not depend on the input; a fixed-width position may, and a feature
    repeated over another dim does)."""
    if len(pos) == 0:
        return "it holds no features"
    if bool((pos.gid < 0).any()):
        return ("it also holds fixed-width features (their number may depend on the input's shape, which "
                "the export's literal part sizes could not follow)")
    pairs = pos.gid * (int(pos.ch.max()) + 1) + pos.ch
    if pairs.unique().numel() < pairs.numel():
        return ("it holds some features several times (flattened with another dim, or concatenated with "
                "themselves): where the cuts fall would depend on that dim's size")
    return None


def _not_whole_pieces(res: Positions, gt: GroupTable) -> Optional[str]:
    """Why the tracked positions of ``res`` (resolved to pieces) are not a sequence of whole
    groups, each in order 0..N-1; None when they are."""
    tracked = res.gid >= 0
    if not bool(tracked.any()):
        return None
    n = len(res)
    start = tracked & _run_starts(res)
    next_start = torch.cat([start[1:] | ~tracked[1:], torch.tensor([True])])
    end = tracked & next_start
    gids = sorted(set(res.gid[tracked].tolist()))
    width = torch.zeros(max(gids) + 1, dtype=torch.long)
    for g in gids:
        width[g] = gt.width[gt.find(g)]
    if bool((res.ch[start] != 0).any()) or bool((res.ch[end] != width[res.gid[end]] - 1).any()):
        return (f"its {n} features are not whole groups in order (a slice of a group, or features "
                "flattened with another dim, each repeated)")
    return None


def _meta_shape(meta) -> Optional[tuple]:
    if meta is not None and hasattr(meta, "shape") and hasattr(meta, "dtype"):
        return tuple(meta.shape)
    return None


def _gids(what) -> set[int]:
    if what is None:
        return set()
    if isinstance(what, int):
        return {what}
    if isinstance(what, FMap):
        return what.pos.gids()
    if isinstance(what, Positions):
        return what.gids()
    out: set[int] = set()
    for w in what:
        out |= _gids(w)
    return out


def _tensor_result(node: torch.fx.Node) -> bool:
    """Whether the node computes tensors (shape propagation recorded some): features
    cannot hide in a dtype or a plain number, only in a width, which is pinned apart."""
    def has(m) -> bool:
        if isinstance(m, TensorMetadata):
            return True
        if isinstance(m, (tuple, list)):
            return any(has(x) for x in m)
        return isinstance(m, dict) and any(has(x) for x in m.values())

    return has(node.meta.get("tensor_meta"))


def _values_in(v, kind: type = FMap) -> list:
    """The values of type ``kind`` (feature maps, or parameter references) in ``v``,
    also inside tuples, lists and dicts."""
    if isinstance(v, kind):
        return [v]
    if isinstance(v, (tuple, list)):
        return [f for x in v for f in _values_in(x, kind)]
    if isinstance(v, dict):
        return [f for x in v.values() for f in _values_in(x, kind)]
    return []


def _fetch(gm: nn.Module, qual: str) -> Any:
    mod, _, name = qual.rpartition(".")
    try:
        return getattr(gm.get_submodule(mod) if mod else gm, name)
    except AttributeError:
        return None


def _opaque_owned(gm: torch.fx.GraphModule, opaque: dict) -> tuple[set[int], set[int]]:
    """ids of the tensors and modules opaque blocks use: their own (shared ones included)
    and tensors their callers hand them (``get_attr`` arguments). Slicing any of them would
    change what the block computes, which the analysis cannot see."""
    tensors: set[int] = set()
    modules: set[int] = set()
    for name in opaque:
        block = _fetch(gm, name) if name else None
        if isinstance(block, nn.Module):
            modules.update(id(m) for m in block.modules())
            tensors.update(id(t) for t in block.parameters())
            tensors.update(id(t) for t in block.buffers())
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in opaque:
            tensors.update(id(_fetch(gm, a.target)) for a in node.all_input_nodes if a.op == "get_attr")
    tensors.discard(id(None))
    return tensors, modules


class _Walker:
    def __init__(self, traced: Traced, registry: RuleRegistry):
        self.traced = traced
        self.gm = traced.gm
        self.registry = registry
        self.modules = dict(self.gm.named_modules())
        self.groups = GroupTable()
        self.values: dict[str, Any] = {}
        self.pending: list[tuple[int, Rejection]] = []
        self.produced: dict[str, set[int]] = {}
        self.consumed: dict[str, set[int]] = {}
        self.params: dict[str, tuple] = {}
        self.param_nodes: dict[str, list[str]] = {}
        self.attrs: dict[str, dict] = {}
        self.gates: dict[str, list[str]] = {}
        self.mac_terms: dict[str, tuple] = {}
        self.rewrites: dict[str, dict] = {}
        self.rnns: dict[str, Positions] = {}
        self.norms: dict[str, Positions] = {}
        self.fnorms: dict[str, Positions] = {}
        self.touched: dict[str, set[int]] = {}
        self.rejected_at: dict[str, set[int]] = {}   # node -> groups rejected there
        self.shape_read: dict[str, set[int]] = {}    # node -> groups it reads only the shape/dtype of
        self.pinned: dict[str, torch.fx.Node] = {}  # parameters read by ops without a rule
        self.returned: dict[str, torch.fx.Node] = {}  # parameters the model returns as they are
        self.derived: dict[str, torch.fx.Node] = {}  # parameters a rule read without planning them
        # blocks fx could not trace, and what they own
        self.opaque = {o.name: o for o in getattr(traced, "opaque", ())}
        self.opaque_tensors, self.opaque_modules = _opaque_owned(self.gm, self.opaque)

    def reaching(self, node: torch.fx.Node) -> list[FMap]:
        """The tracked tensors among ``node``'s inputs, also inside tuple values (an RNN's
        ``(out, h)`` passed whole)."""
        return [f for n in node.all_input_nodes for f in _values_in(self.values.get(n.name))]

    def is_opaque(self, node: torch.fx.Node) -> bool:
        """An auto-leaf no rule names by its exact type: a black box."""
        return (node.op == "call_module" and node.target in self.opaque
                and type(self.modules[node.target]) not in self.registry.modules)

    def reject(self, gid: int, node: torch.fx.Node, reason: str, kind: str) -> None:
        if kind == "unsupported" and self.groups.width[self.groups.find(gid)] == 1:
            kind = "fixed"   # one feature (an attention-pooling score): nothing to learn, not a problem
        self.rejected_at.setdefault(node.name, set()).add(gid)
        module = self.modules.get(node.target) if node.op == "call_module" else None
        self.pending.append((gid, Rejection(node=node.name, op=_op_name(node, module), reason=reason,
                                            location=source_location(node.stack_trace), kind=kind)))

    def plan_param(self, qual: str, dims: tuple, node: torch.fx.Node) -> None:
        # a tensor an opaque block uses is never sliced
        if self.opaque_tensors and id(_fetch(self.gm, qual)) in self.opaque_tensors:
            Ctx(self, node).reject([d for d in dims if d is not None],
                                   f"{qual} is also used inside an opaque block; it keeps its shape")
            return
        if qual in self.params:
            old = self.params[qual]
            ctx = Ctx(self, node)
            merged = []
            for a, b in zip(old, dims):
                if a is None and b is None:
                    merged.append(None)
                else:
                    merged.append(ctx.unify([a if a is not None else Positions.fixed(len(b)),
                                             b if b is not None else Positions.fixed(len(a))],
                                            f" (parameter {qual} is shared)"))
            dims = tuple(merged)
        self.params[qual] = dims
        self.param_nodes.setdefault(qual, []).append(node.name)

    # -- the walk -------------------------------------------------------------------
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            self.values[node.name] = self.visit(node)
            ins = self.reaching(node)
            outs = _values_in(self.values[node.name])
            self.touched[node.name] = _gids(ins) | _gids(outs)
            self.check_macs(node)
        self.pin_derived()

    def visit(self, node: torch.fx.Node) -> Any:
        if node.op == "placeholder":
            return None
        if node.op == "get_attr":
            return ParamRef(node.target)
        if node.op == "output":
            for fm in _values_in(self.value_of_args(node)):
                Ctx(self, node).reject(fm, "reaches the model output", kind="fixed")
            for ref in _values_in(self.value_of_args(node), ParamRef):
                self.returned.setdefault(ref.target, node)
            self.pin_widths(node, None)
            return None
        ctx = Ctx(self, node)
        if node.op == "call_module":
            rule = self.registry.for_module(ctx.module)
            # an auto-leaf's own forward is what runs; a rule found along the MRO would
            # describe another forward
            if self.is_opaque(node):
                rule = None
        elif node.op == "call_method":
            rule = self.registry.for_method(node.target)
        else:
            rule = self.registry.for_function(node.target)
        self.pin_widths(node, rule)
        if rule is None:
            return self.unknown(ctx)
        try:
            value = rule(ctx)
        except Exception as exc:  # a rule that cannot read this call: reject, never crash
            if getattr(rule, "reads_widths", False):
                self.pin_widths(node, None)
            reaching = self.reaching(node)
            ctx.reject(reaching + list(self.produced.get(node.name, ())),
                       f"the rule for {_op_name(node, ctx.module)} cannot read this call "
                       f"({type(exc).__name__}: {exc})")
            for n in node.all_input_nodes:
                if isinstance(ref := self.values.get(n.name), ParamRef):
                    self.pinned.setdefault(ref.target, node)   # a view's node is a getitem
            return None
        for n in node.all_input_nodes:
            ref = self.values.get(n.name)
            passed_on = isinstance(value, ParamRef) and isinstance(ref, ParamRef) and value.target == ref.target
            if isinstance(ref, ParamRef) and node.name not in self.param_nodes.get(ref.target, ()) and not passed_on:
                self.derived.setdefault(ref.target, node)
        if node.op == "call_module" or _tensor_result(node):
            self.account(ctx, value, within=not getattr(rule, "selects", False))
        return value

    def account(self, ctx: Ctx, value: Any, within: bool = True) -> None:
        """A rule must say what becomes of every tracked feature that reaches its op: it
        passes them on, consumes them (slices a weight, gates them), ties them to another
        group, reads only their shape or dtype, or rejects them. Features it says nothing
        of are an argument the rule does not read — an LSTM's ``hx`` held in one value,
        the second operand of a binary ``torch.max``, a weight computed from features,
        an index computed from them: their group would shrink while the op still sees
        the full width. They keep their width.

        ``within``: also the tensors inside tuple values; not for a rule that picks from a
        container (``t[0]``, ``t.values``), which leaves the rest for later nodes."""
        node = ctx.node
        if within:
            reaching = _gids(self.reaching(node))
        else:
            reaching = _gids([v for n in node.all_input_nodes
                              if isinstance(v := self.values.get(n.name), FMap)])
        if not reaching:
            return
        find = self.groups.find
        said = {find(g) for g in (_gids(_values_in(value)) | _gids([w.pos for w in widths_in(value)])
                                  | self.consumed.get(node.name, set()) | self.shape_read.get(node.name, set())
                                  | self.rejected_at.get(node.name, set()))}
        lost = sorted(g for g in reaching if find(g) not in said)
        if lost:
            what = type(ctx.module).__name__ if ctx.module is not None else _op_name(node, None)
            ctx.reject(lost, f"reaches {what} in an argument its rule does not read; "
                             "the op would still see the full width")

    def pin_widths(self, node: torch.fx.Node, rule) -> None:
        """A number read from a group's width (``h.size(1)``, ``h.shape[-1]``) is N in the gated
        model and the kept count after export: a node that computes with it keeps the group
        fixed, unless its rule handles widths itself (indexing a size tuple, a reshape
        whose size is recomputed)."""
        if getattr(rule, "reads_widths", False):
            return
        from .rules.common import pin_widths, widths_in
        widths = widths_in([self.values.get(n.name) for n in node.all_input_nodes])
        if widths:
            module = self.modules.get(node.target) if node.op == "call_module" else None
            pin_widths(Ctx(self, node), widths, _op_name(node, module))

    def pin_derived(self) -> None:
        """A parameter a rule read without slicing it (``e.weight.t()``, ``e.weight.T``, a view
        of it: weight tying through a shape op) must keep its shape where another rule
        plans to slice it: the op would see the sliced tensor."""
        for qual, node in self.derived.items():
            if qual in self.params:
                Ctx(self, node).reject([d for d in self.params[qual] if d is not None],
                                       f"{qual} is also read by {_op_name(node, self.modules.get(node.target))}"
                                       ", which does not slice it "
                                       "with the group (a tied or reshaped weight); it keeps its shape")

    def value_of_args(self, node):
        return torch.fx.node.map_arg(node.args, lambda n: self.values.get(n.name))

    def unknown(self, ctx: Ctx) -> None:
        # a parameter an unknown op reads must keep its shape, whatever else plans for it
        for n in ctx.node.all_input_nodes:
            if isinstance(ref := self.values.get(n.name), ParamRef):
                self.pinned.setdefault(ref.target, ctx.node)   # also through a view (self.pe[:T])
        reaching = self.reaching(ctx.node)
        leaf = self.opaque.get(ctx.target) if self.is_opaque(ctx.node) else None
        if leaf is not None:
            if reaching:
                ctx.reject(reaching, f"opaque block {leaf.name} ({leaf.type}): {leaf.describe()}; "
                           "its inputs and outputs keep their width")
            return None
        if reaching:
            ctx.reject(reaching, f"no rule for {_op_name(ctx.node, ctx.module)}{_inside(ctx.node)}; "
                       "dcopt does not assume an unknown op keeps features apart")
        return None

    def check_macs(self, node: torch.fx.Node) -> None:
        """A node that costs MACs and touches a group must say how its MACs scale."""
        macs = self.traced.macs.get(node.name, 0)
        if self.is_opaque(node):
            return  # an opaque leaf: what reaches them was rejected in unknown()
        if macs and node.name not in self.mac_terms and self.touched[node.name]:
            Ctx(self, node).reject(list(self.touched[node.name]),
                                   "costs MACs that dcopt cannot express in the group widths")


# ----------------------------------------------------------------------------------------
# Result
# ----------------------------------------------------------------------------------------

class Analysis:
    """What dcopt found in a model: roles, groups, rejections and MACs.

    Example::

        a = dcopt.analyze(model, (torch.randn(1, 3, 32, 32),))
        print(a.convertible, a.dynamic_fraction)
        rich.print(a.render())
    """

    def __init__(self, *, roles, groups, rejections, macs, params, dynamic_macs, graph, plan, node_keys,
                 opaque=()):
        self.roles: dict[str, str] = roles
        self.groups: list[Group] = groups
        self.rejections: list[Rejection] = rejections
        self.macs: int = macs
        self.params: int = params
        self.dynamic_macs: int = dynamic_macs
        self.graph: nx.DiGraph = graph
        self.plan: Plan = plan
        self.node_keys: dict[str, str] = node_keys
        #: submodules fx could not trace, kept as black boxes: name, type, reason, location
        self.opaque: list[OpaqueLeaf] = list(opaque)

    @property
    def convertible(self) -> bool:
        return any(g.status == "dynamic" for g in self.groups)

    @property
    def dynamic_fraction(self) -> float:
        return self.dynamic_macs / self.macs if self.macs else 0.0

    @property
    def unsupported(self) -> list[Rejection]:
        return [r for r in self.rejections if r.kind == "unsupported"]

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no group named {name!r}; groups: {[g.name for g in self.groups]}")

    @property
    def dynamic_groups(self) -> list[Group]:
        return [g for g in self.groups if g.status == "dynamic"]

    def to_dict(self) -> dict:
        return dict(convertible=self.convertible, macs=self.macs, params=self.params,
                    dynamic_macs=self.dynamic_macs, dynamic_fraction=self.dynamic_fraction,
                    roles=dict(self.roles), groups=[g.to_dict() for g in self.groups],
                    rejections=[r.to_dict() for r in self.rejections],
                    opaque=[o.to_dict() for o in self.opaque])

    def render(self):
        from .report import render_analysis
        return render_analysis(self)

    def __rich__(self):
        return self.render()

    def __repr__(self) -> str:
        n_dyn = len(self.dynamic_groups)
        return (f"Analysis(groups={len(self.groups)}, dynamic={n_dyn}, rejections={len(self.unsupported)}, "
                f"macs={self.macs:,}, dynamic_fraction={self.dynamic_fraction:.1%})")


def _node_keys(gm: torch.fx.GraphModule) -> dict[str, str]:
    """Readable key per node: the module's qualified name for module calls (``layer1.0.conv1``)."""
    keys, seen = {}, {}
    for node in gm.graph.nodes:
        key = node.target if node.op == "call_module" else node.name
        seen[key] = seen.get(key, 0) + 1
        keys[node.name] = key if seen[key] == 1 else f"{key}#{seen[key]}"
    return keys


def _attr_safe(name: str, taken: set) -> str:
    base = re.sub(r"\W", "_", name) or "g"
    key, i = base, 1
    while key in taken:
        i += 1
        key = f"{base}_{i}"
    taken.add(key)
    return key


def _pin_shared_modules(w: _Walker) -> None:
    """A module called more than once is sliced only if every call planned the slice: a
    call whose rule kept it fixed (features on a dim it mixes, say) needs its full width."""
    calls: dict[str, list[torch.fx.Node]] = {}
    for node in w.gm.graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    for qual, dims in w.params.items():
        owner = qual.rpartition(".")[0]
        nodes = calls.get(owner, [])
        if len(nodes) < 2:
            continue
        planners = set(w.param_nodes.get(qual, ()))
        missing = [n for n in nodes if n.name not in planners]
        if missing:
            Ctx(w, missing[0]).reject([d for d in dims if d is not None],
                                      f"module {owner} is called {len(nodes)} times and this call keeps "
                                      "its full width")


def _leaf_set(gt: GroupTable, gids: Iterable[int]) -> set[int]:
    """The groups (unrefined roots) that ``gids`` stand for: their classes, or the pieces a
    split of the feature dim cut them into."""
    return {leaf for g in gids for _, leaf in gt.leaves(g)}


def _pin_split_rnns(w: _Walker) -> None:
    """An RNN's hidden units are removed inside the recurrence by one size (GatedRNN): a
    split of its features (``out.chunk(2, -1)``) that cut them into parts with sizes of
    their own keeps them all fixed."""
    calls = {n.target: n for n in w.gm.graph.nodes if n.op == "call_module" and n.target in w.rnns}
    for target, pos in w.rnns.items():
        if any(len(w.groups.leaves(g)) > 1 for g in pos.gids()):
            Ctx(w, calls[target]).reject(pos, f"the hidden units of {target} are split into parts further on; "
                                              "dcopt removes an RNN's units by one size, so they keep their width")


def _finalize(w: _Walker) -> Analysis:
    gt = w.groups
    _pin_shared_modules(w)
    _pin_split_rnns(w)
    for qual, node in w.pinned.items():
        if qual in w.params:
            Ctx(w, node).reject([d for d in w.params[qual] if d is not None],
                                f"{qual} is read by {_op_name(node, None)}{_inside(node)}, which has no rule; "
                                "it keeps its shape")
    for qual, node in w.returned.items():
        if qual in w.params:
            Ctx(w, node).reject([d for d in w.params[qual] if d is not None],
                                f"{qual} is returned by the model as it is; it keeps its shape", kind="fixed")
    # A tensor a rule plans or counts must be a Parameter or buffer under that very name:
    # a computed one (a user rule on a parametrized layer) would slice nothing, and a tied
    # one (named_parameters lists it under its first name) would be sliced twice.
    param_numel = {n: p.numel() for n, p in w.gm.named_parameters()}
    owned = dict(w.gm.named_buffers())
    owned.update(w.gm.named_parameters())
    first_name = {id(t): q for q, t in owned.items()}
    nodes = {n.name: n for n in w.gm.graph.nodes}
    for qual in [q for q in w.params if q not in owned]:
        alias = first_name.get(id(_fetch(w.gm, qual)))
        why = (f"{qual} is the same tensor as {alias} (tied weights): it keeps its shape" if alias else
               f"{qual} is not a parameter or buffer (a parametrization or a hook computes it); it keeps its shape")
        for q in (qual, alias):
            if q in w.params:
                Ctx(w, nodes[w.param_nodes[q][0]]).reject([d for d in w.params[q] if d is not None], why)
    for node_name, (_, quals, _, _) in w.mac_terms.items():
        missing = [q for q in quals if q not in param_numel]
        if missing and w.touched.get(node_name):
            Ctx(w, nodes[node_name]).reject(list(w.touched[node_name]),
                                            f"its MACs scale with {', '.join(missing)}, which is not a parameter")
    # the groups are the unrefined roots; a rejection of a refined group covers its pieces
    roots = gt.leaf_roots()
    bad: dict[int, list[Rejection]] = {}
    for gid, rej in w.pending:
        for leaf in _leaf_set(gt, (gid,)):
            bad.setdefault(leaf, []).append(rej)
    keys = _node_keys(w.gm)

    live_roots = [r for r in roots if r not in bad]
    live_index = {r: i for i, r in enumerate(live_roots)}
    # readable names: the first producer of each root
    # every root's producers in gid order, in one pass (a scan of all gids per root was
    # quadratic: 1000 groups took seconds)
    root_producers: dict[int, list[str]] = {}
    for gid in range(len(gt)):
        root_producers.setdefault(gt.find(gid), []).extend(gt.producers[gid])
    first_producer = {r: ps[0] for r, ps in root_producers.items()}
    taken: set = set()
    specs = [GroupSpec(name=first_producer[r], key=_attr_safe(first_producer[r], taken), width=gt.width[r],
                       producers=list(root_producers[r]))
             for r in live_roots]

    # raw gid -> live group index (or FIXED); built once, applied to every map
    lut = torch.tensor([live_index.get(gt.find(g), FIXED) for g in range(len(gt))] + [FIXED], dtype=torch.long)

    mapped: dict[int, tuple[Positions, Positions]] = {}   # id(pos) -> (pos, live(pos)): maps are shared

    def live(pos: Optional[Positions]) -> Optional[Positions]:
        if pos is None:
            return None
        hit = mapped.get(id(pos))
        if hit is not None:
            return hit[1]
        leaf = gt.resolve(pos)   # channels of a refined group: its pieces' own channels
        gid = torch.where(leaf.gid >= 0, lut[leaf.gid.clamp(min=0)], torch.full_like(leaf.gid, FIXED))
        ch = torch.where(gid >= 0, leaf.ch, torch.zeros_like(leaf.ch))
        out = Positions(gid, ch)
        mapped[id(pos)] = (pos, out)
        return out

    def is_live(gids: Iterable[int]) -> set[int]:
        return {r for r in _leaf_set(gt, gids) if r in live_index}

    # roles
    roles: dict[str, str] = {}
    for node in w.gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            roles[keys[node.name]] = FCL
            continue
        if is_live(w.produced.get(node.name, ())):
            roles[keys[node.name]] = DCL
        elif is_live(w.consumed.get(node.name, ())) or is_live(w.touched.get(node.name, ())):
            roles[keys[node.name]] = ACL
        else:
            roles[keys[node.name]] = FCL

    # plan
    gates = []
    for src, consumers in w.gates.items():
        fm = w.values[src]
        pos = live(fm.pos)
        if pos is not None and not pos.is_fixed():
            gates.append(GateSpec(source=src, dim=fm.dim, pos=pos, consumers=consumers))
            for g in pos.gids():
                specs[g].consumers.extend(keys[c] for c in consumers if keys[c] not in specs[g].consumers)
    params = {q: tuple(live(d) for d in dims) for q, dims in w.params.items()}
    params = {q: dims for q, dims in params.items() if any(d is not None and not d.is_fixed() for d in dims)}
    attrs = {t: {a: (k, live(p)) for a, (k, p) in d.items()} for t, d in w.attrs.items()}
    rnns = {t: live(p) for t, p in w.rnns.items() if not live(p).is_fixed()}
    norms = {t: live(p) for t, p in w.norms.items() if not live(p).is_fixed()}
    fnorms = {t: live(p) for t, p in w.fnorms.items() if not live(p).is_fixed()}
    rewrites = {}
    for name, spec in w.rewrites.items():
        spec = {k: (live(v) if isinstance(v, Positions) else v) for k, v in spec.items()}
        if spec["kind"] == "set_kwarg" and spec["pos"].is_fixed():
            continue   # the width it stands for stays: torch's own default is that number
        rewrites[name] = spec

    mac_terms, const_macs, dynamic_macs = [], 0, 0
    group_macs = {r: 0 for r in live_roots}
    for node_name, macs in w.traced.macs.items():
        term = w.mac_terms.get(node_name)
        touching = is_live(w.touched.get(node_name, ()))
        if term is None or not touching:
            const_macs += macs
            continue
        coef, quals, extra, vanish = term
        extra_live = [live(e) for e in extra]
        if not quals and all(e.is_fixed() for e in extra_live):
            const_macs += macs   # a constant a rule stated (features kept here): not dynamic MACs
            continue
        if coef is None:
            full = (sum(param_numel[q] for q in quals) if quals else 1) * math.prod(len(e) for e in extra)
            coef = macs / full if full else 0.0
        mac_terms.append(MacTerm(node=node_name, coef=coef, params=quals, extra=extra_live,
                                 vanish_at_one=vanish))
        dynamic_macs += macs
        for r in touching:
            group_macs[r] += macs
    total_macs = sum(w.traced.macs.values())
    # MACs of nodes the counter does not see (LSTM) but a rule gave a formula for
    for node_name, (coef, quals, extra, vanish) in w.mac_terms.items():
        if node_name in w.traced.macs or coef is None:
            continue
        macs = int(round(coef * sum(param_numel[q] if q in param_numel else _fetch(w.gm, q).numel()
                                    for q in quals) * math.prod(len(e) for e in extra)))
        total_macs += macs
        touching = is_live(w.touched.get(node_name, ()))
        if touching:
            mac_terms.append(MacTerm(node=node_name, coef=coef, params=quals, extra=[live(e) for e in extra],
                                     vanish_at_one=vanish))
            dynamic_macs += macs
            for r in touching:
                group_macs[r] += macs
        else:
            const_macs += macs

    plan = Plan(groups=specs, params=params, attrs=attrs, rewrites=rewrites, gates=gates, rnns=rnns,
                mac_terms=mac_terms, const_macs=const_macs, total_macs=total_macs, param_numel=param_numel,
                norms=norms, fnorms=fnorms)

    # person-facing groups (every root, dynamic or not)
    members: dict[int, list[str]] = {r: [] for r in roots}
    for node in w.gm.graph.nodes:
        for r in _leaf_set(gt, w.touched.get(node.name, ())):
            members[r].append(keys[node.name])
    groups: list[Group] = []
    rejections: list[Rejection] = []
    for r in roots:
        name = first_producer[r]
        if r in live_index:
            spec = specs[live_index[r]]
            groups.append(Group(name=name, width=gt.width[r], status="dynamic", producers=spec.producers,
                                consumers=spec.consumers, members=members[r],
                                macs_share=group_macs[r] / total_macs if total_macs else 0.0))
            continue
        rejs = bad[r]
        status = "rejected" if any(x.kind == "unsupported" for x in rejs) else "fixed"
        producers = list(root_producers[r])
        seen = set()
        reasons = []
        for x in rejs:
            x.group = name
            x.node = keys.get(x.node, x.node)
            sig = (x.node, x.reason)
            if sig in seen:
                continue
            seen.add(sig)
            reasons.append(f"{x.node}: {x.reason}")
            rejections.append(x)
        groups.append(Group(name=name, width=gt.width[r], status=status, producers=producers, consumers=[],
                            members=members[r], macs_share=0.0, reasons=reasons))

    graph = nx.DiGraph()
    for node in w.gm.graph.nodes:
        graph.add_node(keys[node.name], op=node.op, target=str(node.target), role=roles[keys[node.name]],
                       shape=_meta_shape(node.meta.get("tensor_meta")),
                       module_type=type(w.modules[node.target]).__name__ if node.op == "call_module" else None)
        for inp in node.all_input_nodes:
            graph.add_edge(keys[inp.name], keys[node.name])
    n_params = sum(param_numel.values())   # named_parameters, like parameters(), lists a shared one once
    return Analysis(roles=roles, groups=groups, rejections=rejections, macs=total_macs, params=n_params,
                    dynamic_macs=dynamic_macs, graph=graph, plan=plan, node_keys=keys,
                    opaque=getattr(w.traced, "opaque", ()))


def run_analysis(traced: Traced, registry: RuleRegistry = REGISTRY) -> Analysis:
    w = _Walker(traced, registry)
    w.run()
    return _finalize(w)


def analyze(model: nn.Module, example_inputs: Sequence, *, leaf_modules: Iterable = (),
            concrete_args: Optional[dict] = None, registry: RuleRegistry = REGISTRY,
            strict_trace: bool = False) -> Analysis:
    """Find which layer widths of ``model`` can be learned, and why the others cannot.

    ``example_inputs`` is a tuple of tensors the model is called with (shapes matter,
    values do not). The model itself is not changed. It is traced and run as it is, not
    copied (copying a large model costs more than analysing it; tracing and eval-mode,
    no-grad shape propagation leave it as it was, training flags restored) — except a
    model holding a module known to write its own weights in forward (Embedding with
    ``max_norm``, :func:`~dcopt.rules.modules.writes_own_weights`): a copy of that is run.

    Any other forward that writes a parameter or buffer in place is caught afterwards by
    the tensors' version counters and *warned* about, naming them: the write has already
    happened (an error could not undo it, and would withhold an analysis that is still
    right, since shapes do not depend on weight values), it is what calling the model
    does anyway, and the warning says how to keep the model untouched (pass a copy).

    Example::

        a = dcopt.analyze(torchvision.models.resnet18(weights=None), (torch.randn(1, 3, 224, 224),))
        a.groups[0].name, a.groups[0].width, a.groups[0].status
    """
    import itertools
    import warnings

    from .numcheck import input_tuple
    from .rules.modules import writes_own_weights

    example_inputs = input_tuple(example_inputs)
    copy_model = any(writes_own_weights(m) for m in model.modules())
    tensors = [(n, t, t._version) for n, t in itertools.chain(model.named_parameters(), model.named_buffers())
               if not t.is_inference()]   # inference tensors keep no version counter
    traced = trace(model, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args,
                   copy_model=copy_model, strict_trace=strict_trace, lazy_code=True)
    written = [n for n, t, v in tensors if t._version != v]
    if written:
        warnings.warn(f"dcopt.analyze ran the model's forward on the example inputs, and the forward wrote "
                      f"{', '.join(written[:5])}{' ...' if len(written) > 5 else ''} in place: your model has "
                      "changed, as calling it would change it. Pass a copy (copy.deepcopy(model)) to keep it; "
                      "and a forward that rewrites its weights may not convert exactly.", stacklevel=2)
    return run_analysis(traced, registry)
