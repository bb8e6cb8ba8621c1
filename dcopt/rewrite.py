"""Rewrite: insert gates and RNN masks into the traced graph; the DynamicModel users train."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.fx
from torch import nn

from .analysis import Analysis, run_analysis
from .complexity import Complexity, ComplexityModel
from .config import Config
from .errors import ConversionError, TraceError, source_location
from .gates import NORM_FUNCTIONS, FeatureGate, FunctionalNorm, GatedRNN, MaskedNorm, consolidated, floor_size, kappa_for
from .modes import eval_mode
from .numcheck import input_tuple
from .plan import Plan
from .trace import _first_line, trace

__all__ = ["DynamicModel", "SizeInfo", "convert", "build_gated"]

SIZES = "dcopt_sizes"
GATES = "dcopt_gates"


@dataclass(frozen=True)
class SizeInfo:
    """One group's size: continuous ``s``, the integer it would keep, its width N and κ = s/N."""
    s: float
    kept: int
    width: int
    kappa: float


def _local_groups(pos) -> tuple[list[int], torch.Tensor]:
    """The groups ``pos`` holds (sorted), and each position's index among them (-1: fixed):
    a gate's own numbering, without a table of all groups per gate (quadratic in the
    number of groups)."""
    local = sorted(pos.gids())
    local_t = torch.tensor(local, dtype=torch.long)
    return local, torch.where(pos.gid >= 0, torch.searchsorted(local_t, pos.gid.clamp(min=0)), pos.gid)


def build_gated(gm: torch.fx.GraphModule, plan: Plan) -> torch.fx.GraphModule:
    """Insert one FeatureGate per gated tensor, and wrap RNN producers and norms over
    learned features (masked statistics), in place."""
    sizes = nn.Module()
    for g in plan.groups:
        sizes.register_parameter(g.key, nn.Parameter(torch.ones(())))
    gm.add_submodule(SIZES, sizes)
    gm.add_submodule(GATES, nn.Module())
    nodes = {n.name: n for n in gm.graph.nodes}
    graph = gm.graph

    def size_node(g: int) -> torch.fx.Node:
        return graph.get_attr(f"{SIZES}.{plan.groups[g].key}")

    for i, spec in enumerate(plan.gates):
        src = nodes[spec.source]
        local, group = _local_groups(spec.pos)
        meta = src.meta.get("tensor_meta")
        gate = FeatureGate(spec.dim, group, spec.pos.ch, [plan.groups[g].width for g in local],
                           rank=len(meta.shape) if hasattr(meta, "shape") else None,
                           where=source_location(src.stack_trace))
        name = f"g{i}_{spec.source}"
        getattr(gm, GATES).add_module(name, gate)
        with graph.inserting_after(src):
            kappas = []
            anchor = src
            for g in local:
                with graph.inserting_after(anchor):
                    anchor = size_node(g)
                    kappas.append(anchor)
            with graph.inserting_after(anchor):
                gnode = graph.call_module(f"{GATES}.{name}", (src, *kappas))
        for c in spec.consumers:
            nodes[c].replace_input_with(src, gnode)

    calls: dict[str, list[torch.fx.Node]] = {}
    if plan.rnns:
        for node in graph.nodes:
            if node.op == "call_module" and node.target in plan.rnns:
                calls.setdefault(node.target, []).append(node)

    def positions_of(pos) -> tuple[list[int], FeatureGate]:
        """The groups ``pos`` holds, and a FeatureGate of its positions (a norm's mask)."""
        local, group = _local_groups(pos)
        return local, FeatureGate(-1, group, pos.ch, [plan.groups[g].width for g in local])

    for i, (name, pos) in enumerate(plan.fnorms.items()):
        node = nodes[name]
        local, gate = positions_of(pos)
        params = NORM_FUNCTIONS[node.target]
        bound = dict(params)
        bound.update(zip([p for p, _ in params], node.args[1:]))
        bound.update(node.kwargs)
        getattr(gm, GATES).add_module(f"n{i}_{name}", FunctionalNorm(node.target, gate, local,
                                                                      bound["normalized_shape"], bound["eps"]))
        with graph.inserting_before(node):
            kappas = [size_node(g) for g in local]
        # the node itself becomes the module's call (in place: its users and position stay)
        node.op, node.target = "call_module", f"{GATES}.n{i}_{name}"
        node.args, node.kwargs = (node.args[0], bound["weight"], bound.get("bias"), *kappas), {}
    for target, pos in plan.norms.items():
        local, gate = positions_of(pos)
        parent, _, attr = target.rpartition(".")
        norm = gm.get_submodule(target)
        setattr(gm.get_submodule(parent) if parent else gm, attr, MaskedNorm(norm, gate))
        prefix = f"{target}." if target else ""
        for node in list(graph.nodes):
            if node.op == "call_module" and node.target == target:
                args, kwargs = node.args, dict(node.kwargs)
                if "input" in kwargs:   # ``self.ln(input=x)``: the κ follow the input
                    args = (kwargs.pop("input"), *args)
                with graph.inserting_before(node):
                    node.args = (*args, *[size_node(g) for g in local])
                node.kwargs = kwargs
            elif node.op == "get_attr" and str(node.target).startswith(prefix) and "." not in node.target[len(prefix):]:
                node.target = f"{prefix}norm.{node.target[len(prefix):]}"   # the forward reads ``self.ln.bias``
    for target, pos in plan.rnns.items():
        (g,) = pos.gids()
        rnn = gm.get_submodule(target)
        parent, _, attr = target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, attr, GatedRNN(rnn))
        for node in calls.get(target, ()):
            with graph.inserting_before(node):
                k = size_node(g)
            node.args = (k, *node.args)
    graph.lint()
    gm.recompile()
    return gm


class DynamicModel(nn.Module):
    """The model with learnable widths. Train it like the original; then :func:`dcopt.export`.

    Phases: :meth:`fix_sizes` (sizes frozen, no noise — at the start identical to the
    original model) and :meth:`optimize_sizes` (sizes trainable, noise on). In ``eval()``
    every group keeps exactly ⌈s⌉ features with no noise, which is what export keeps.
    """

    def __init__(self, gm: torch.fx.GraphModule, analysis: Analysis, config: Config, template: nn.Module,
                 example_inputs: tuple):
        super().__init__()
        self.gm = gm
        self.config = config
        object.__setattr__(self, "analysis", analysis)
        object.__setattr__(self, "_template", template)
        object.__setattr__(self, "example_inputs", example_inputs)
        plan = analysis.plan
        shapes = {q: tuple(p.shape) for q, p in _plan_tensors(gm, plan)}
        for q in plan.param_numel:
            shapes.setdefault(q, tuple(_lookup(gm, q).shape))
        object.__setattr__(self, "_cx", ComplexityModel(plan, shapes))
        self.register_buffer("beta", torch.tensor(float(config.beta)), persistent=True)
        self._phase = "fixed"
        self.fix_sizes()

    # -- structure ------------------------------------------------------------------------
    @property
    def plan(self) -> Plan:
        return self.analysis.plan

    @property
    def group_names(self) -> list[str]:
        return [g.name for g in self.plan.groups]

    def _kappas(self) -> list[torch.Tensor]:
        sizes = getattr(self.gm, SIZES)
        return [getattr(sizes, g.key) for g in self.plan.groups]

    def size_parameters(self) -> Iterator[nn.Parameter]:
        """The κ of every group (give them their own, slower learning rate)."""
        return iter(self._kappas())

    def weight_parameters(self) -> Iterator[nn.Parameter]:
        ids = {id(k) for k in self._kappas()}
        return (p for p in self.parameters() if id(p) not in ids)

    # -- phases ---------------------------------------------------------------------------
    @property
    def phase(self) -> str:
        return self._phase

    def fix_sizes(self) -> "DynamicModel":
        """Freeze the sizes where they are and turn the noise off (first phase, or settling)."""
        self._set_phase("fixed")
        return self

    def optimize_sizes(self) -> "DynamicModel":
        """Make the sizes trainable and turn the feature noise on (in train mode)."""
        self._set_phase("optimize")
        return self

    def _set_phase(self, phase: str) -> None:
        self._phase = phase
        for k in self._kappas():
            k.requires_grad_(phase == "optimize")
        round_to = self.config.round_to
        for m in self.gm.modules():
            if isinstance(m, FeatureGate):
                m.noise = phase == "optimize"
            if isinstance(m, GatedRNN):
                m.noise = phase == "optimize" and self.config.rnn_noise
            if isinstance(m, (FeatureGate, GatedRNN)):
                m.round_to = round_to

    #: the options the kept sizes depend on (κ clamped to κ_min, ⌈s⌉ rounded up to round_to);
    #: a state dict records them (the CLI's export converts with them)
    SIZING_OPTIONS = ("round_to", "kappa_min")

    def get_extra_state(self):
        # the sizing options travel with the state, so whoever loads it (the CLI's export)
        # can rebuild the sizes this model keeps; so do the sliced buffers a state dict
        # leaves out (``persistent=False``: a rotary cos/sin cache), which reordering
        # permutes with their group: a model rebuilt from the state would read them in the
        # old order against permuted weights
        return {"phase": self._phase, **{k: getattr(self.config, k) for k in self.SIZING_OPTIONS},
                "buffers": {q: t.detach().clone() for q, t in self._unsaved_buffers()}}

    def set_extra_state(self, state):
        self._set_phase(state.get("phase", "fixed"))
        self._loaded_sizing = {k: state[k] for k in self.SIZING_OPTIONS if k in state}
        saved = state.get("buffers", {})
        for q, t in self._unsaved_buffers():
            if q in saved and saved[q].shape == t.shape:
                with torch.no_grad():
                    t.copy_(saved[q])

    def _unsaved_buffers(self):
        """(name, tensor) of every buffer the plan slices that ``state_dict`` leaves out."""
        for q in self.plan.params:
            owner, _, name = q.rpartition(".")
            module = self.gm.get_submodule(owner) if owner else self.gm
            if name in module._non_persistent_buffers_set:
                yield q, module._buffers[name]

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, then a warning when the state was saved under other
        sizing options (``round_to``, ``kappa_min``) and they change the kept sizes: this
        model's eval and export would then keep other widths than the saved model did. The
        options stay this model's (a state from a fixed phase, at full width, loads into a
        model with any κ_min without a word)."""
        self._loaded_sizing = {}
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        saved = {k: self._loaded_sizing.get(k, getattr(self.config, k)) for k in self.SIZING_OPTIONS}
        if any(saved[k] != getattr(self.config, k) for k in self.SIZING_OPTIONS):
            theirs = self._kept_under(saved["kappa_min"], saved["round_to"])
            ours = self.kept_sizes()
            if theirs != ours:
                differ = {g.name: (a, b) for g, a, b in zip(self.plan.groups, theirs, ours) if a != b}
                warnings.warn(f"the loaded state was saved with {saved}; this DynamicModel has "
                              f"{ {k: getattr(self.config, k) for k in self.SIZING_OPTIONS} }, so it keeps other widths "
                              f"(saved → here: {differ}). Convert with the saved options to keep the saved "
                              "model's widths.", UserWarning, stacklevel=2)
        return result

    # -- forward --------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        """``.to(dtype)``, ``.double()``, ``.to(device)`` ... reach the example inputs as they
        reach buffers: export and reorder run the model on them, and float32 inputs into a
        float64 model raised a dtype error."""
        result = super()._apply(fn, recurse)
        object.__setattr__(self, "example_inputs", torch.utils._pytree.tree_map_only(
            torch.Tensor, fn, self.example_inputs))
        return result

    def forward(self, *args, **kwargs):
        self._project()
        return self.gm(*args, **kwargs)

    @torch.no_grad()
    def _project(self) -> None:
        """Keep κ in [κ_min, 1] (a projection after each optimizer step, done lazily).

        Only an out-of-range κ is touched: an in-place write would bump its version and
        break the backward of an earlier forward (gradient accumulation)."""
        lo = self.config.kappa_min
        for k in self._kappas():
            if not lo <= float(k) <= 1.0:
                k.clamp_(lo, 1.0)

    # -- sizes ----------------------------------------------------------------------------
    def sizes(self) -> dict[str, SizeInfo]:
        out = {}
        kept = self._kept_under(self.config.kappa_min, self.config.round_to)
        for g, k, n in zip(self.plan.groups, self._kappas(), kept):
            kk = float(k.detach().clamp(self.config.kappa_min, 1.0))
            out[g.name] = SizeInfo(s=kk * g.width, kept=n, width=g.width, kappa=kk)
        return out

    def _kept_under(self, kappa_min: float, round_to: int) -> list[int]:
        """The kept size of every group at the current κ under these sizing options."""
        return [consolidated(k.detach().clamp(kappa_min, 1.0), g.width, round_to)
                for g, k in zip(self.plan.groups, self._kappas())]

    def kept_sizes(self) -> list[int]:
        return [info.kept for info in self.sizes().values()]

    @torch.no_grad()
    def set_sizes(self, sizes: dict[str, int]) -> None:
        """Set groups to integer sizes (by group name), e.g. to inspect a smaller model.

        Every entry is checked (and its κ found) before any group changes, so a refused
        call leaves the model as it was. Each κ is the value of κ's dtype that keeps
        exactly that size (:func:`dcopt.gates.kappa_for`), not ``n/N`` rounded: on a wide
        group that kept n+1."""
        by_name = {g.name: (g, k) for g, k in zip(self.plan.groups, self._kappas())}
        values = []
        for name, n in sizes.items():
            self.check_size(name, n)
            g, k = by_name[name]
            values.append((k, kappa_for(int(n), g.width, k.dtype, self.config.kappa_min)))
        for k, v in values:
            k.copy_(v)

    def size_floor(self, name: str) -> int:
        """The smallest size group ``name`` can take: ⌈κ_min·N⌉ (κ is clamped to κ_min), or
        one more where κ_min rounded to κ's dtype keeps one more (:func:`dcopt.gates.floor_size`)."""
        if name not in self.group_names:
            raise KeyError(f"no dynamic group named {name!r}; groups: {self.group_names}")
        i = self.group_names.index(name)
        return floor_size(self.config.kappa_min, self.plan.groups[i].width, self._kappas()[i].dtype)

    def check_size(self, name: str, n) -> None:
        """Raise ``ValueError`` unless ``n`` is a size group ``name`` can take. A size below
        the κ_min floor is refused rather than clamped: the model would silently keep
        more features than asked for."""
        if name not in self.group_names:
            raise KeyError(f"no dynamic group named {name!r}; groups: {self.group_names}")
        width = self.plan.groups[self.group_names.index(name)].width
        lo = self.size_floor(name)
        if int(n) != n or not lo <= int(n) <= width:
            raise ValueError(f"size of {name} must be an integer in [{lo}, {width}], got {n}"
                             + (f" (κ_min = {self.config.kappa_min:g} keeps at least {lo}; convert with a lower "
                                f"kappa_min to go below)" if 1 <= n < lo else ""))

    # -- complexity -----------------------------------------------------------------------
    def complexity(self, at: str = "current") -> Complexity:
        """MACs and parameters. ``at="current"``: at the continuous sizes, differentiable;
        ``at="kept"``: at the integer sizes eval and export use; ``at="full"``."""
        if at == "current":
            s = [_st_clamp(k, self.config.kappa_min) * g.width for k, g in zip(self._kappas(), self.plan.groups)]
        elif at == "kept":
            s = [torch.tensor(float(n)) for n in self.kept_sizes()]
        elif at == "full":
            s = [torch.tensor(float(g.width)) for g in self.plan.groups]
        else:
            raise ValueError(f"at must be 'current', 'kept' or 'full', got {at!r}")
        return self._cx(s)

    def complexity_loss(self) -> torch.Tensor:
        """The complexity term to add to the task loss.

        "l2": (β/G)·Σκ²  — the paper's. "macs": β·MACs(s)/MACs_full. Budget mode
        (``target_macs`` = t) is an augmented Lagrangian on the MACs fraction f:
        β·f + ρ/2·(f − t)², with one dual-ascent step per call,
        β ← max(0, β + dual_lr·(f − t)) — so call it once per training step (a second
        call steps β again; its earlier terms still backpropagate). The quadratic
        term stops the overshoot that plain dual ascent shows while sizes are still moving.
        """
        kappas = [_st_clamp(k, self.config.kappa_min) for k in self._kappas()]
        if not kappas:
            return torch.zeros(())
        cfg = self.config
        if cfg.target_macs is not None:
            frac = self.complexity().macs_fraction.to(kappas[0].dtype)
            if self._phase == "optimize" and self.training:
                with torch.no_grad():
                    step = cfg.dual_lr * (float(frac) - cfg.target_macs)
                    self.beta.copy_((self.beta + step).clamp(min=0.0))
            # β's value now, not the buffer: the next call's dual step writes the buffer in
            # place, and autograd would refuse a backward through a term that saved it
            # (a second call before backward: logging the term, gradient accumulation)
            return self.beta.clone() * frac + 0.5 * cfg.budget_rho * (frac - cfg.target_macs) ** 2
        if cfg.regularizer == "macs":
            return self.beta * self.complexity().macs_fraction.to(kappas[0].dtype)
        return self.beta / len(kappas) * sum(k ** 2 for k in kappas)

    def extra_repr(self) -> str:
        return f"groups={len(self.plan.groups)}, phase={self._phase}"


def _st_clamp(k: torch.Tensor, lo: float) -> torch.Tensor:
    """κ clamped to [lo, 1] in value, with the gradient passed straight through: at κ = 1,
    where every size starts, clamp's own gradient is zero and no pressure would reach it."""
    return k + (k.detach().clamp(lo, 1.0) - k.detach())


def _lookup(gm: nn.Module, qual: str) -> torch.Tensor:
    mod, _, name = qual.rpartition(".")
    owner = gm.get_submodule(mod) if mod else gm
    if isinstance(owner, (GatedRNN, MaskedNorm)):
        owner = owner.inner
    return getattr(owner, name)


def _plan_tensors(gm, plan: Plan):
    for q in plan.params:
        yield q, _lookup(gm, q)


def convert(model: nn.Module, example_inputs: Optional[Sequence] = None, config: Optional[Config] = None,
            **options: Any) -> DynamicModel:
    """Make the layer widths of ``model`` learnable; returns a :class:`DynamicModel`.

    The user's model is deep-copied, never changed. Layers the analysis cannot prove
    exact stay fixed (``strict=True`` raises :class:`~dcopt.ConversionError` instead).
    Without ``example_inputs`` the conversion happens on the first forward call, as
    torch's Lazy modules do: run one batch before building the optimizer.

    Example::

        dm = dcopt.convert(model, (torch.randn(8, 257),), kappa_min=0.25)
        opt = torch.optim.Adam([{"params": dm.weight_parameters()},
                                {"params": dm.size_parameters(), "lr": 3e-4}], lr=1e-3)
    """
    cfg = Config.build(config, options)
    if example_inputs is None:
        return LazyDynamicModel(model, cfg)
    example_inputs = input_tuple(example_inputs)
    traced = trace(model, example_inputs, leaf_modules=cfg.leaf_modules, concrete_args=cfg.concrete_args,
                   strict_trace=cfg.strict_trace, compare_train=True)
    analysis = run_analysis(traced)
    if cfg.strict and analysis.unsupported:
        lines = "; ".join(f"{r.node}: {r.reason}" + (f" ({r.location})" if r.location else "")
                          for r in analysis.unsupported)
        raise ConversionError(f"{len(analysis.unsupported)} layer(s) must stay fixed: {lines}",
                              analysis.unsupported)
    gm = build_gated(traced.gm, analysis.plan)
    dm = DynamicModel(gm, analysis, cfg, traced.source, example_inputs)
    dm._random_in_eval = list(traced.gm.meta.get("random_in_eval", ()))
    if dm._random_in_eval:
        import warnings
        warnings.warn(f"the model draws random numbers in eval mode ({', '.join(dm._random_in_eval)}): its "
                      "outputs differ from run to run, so export cannot check the smaller model against the "
                      "converted one. Make the randomness depend on self.training (F.scaled_dot_product_attention's "
                      "dropout_p applies in eval too: dropout_p=self.p if self.training else 0.0), or export "
                      "with verify=False", stacklevel=2)
    _check_traced_equals_model(model, dm)
    if traced.grad_mode_sites:
        _check_same_gradients(model, dm, traced.grad_mode_sites)
    if traced.train_branch is not None and _train_mode_differs(model, dm):
        # the converted model keeps the eval-mode computation in every phase; an export of
        # the user's class would run the train-mode one (on resized layers, if any)
        dm._train_branch = traced.train_branch
        import warnings
        warnings.warn(f"the model's forward computes something else in train mode than in eval mode "
                      f"({traced.train_branch}); dcopt traces in eval mode, so the converted model runs the "
                      "eval-mode computation in every phase, training included (the fixed phase is then not "
                      "your model's training), and export returns a GraphModule that does the same. To keep "
                      "the train-mode behaviour, make that block a leaf (leaf_modules=[...]: its widths stay "
                      "fixed) or make it independent of self.training", stacklevel=2)
    return dm


#: the converted model at full width runs the same ops as the user's: rounding only
FIDELITY_TOL = 1e-5


def _seeded_run(m: nn.Module, inputs: tuple):
    """``m`` on fresh copies of ``inputs``, with the RNG seeded alike for every model
    compared (and the caller's RNG state untouched), without grad."""
    from .numcheck import fresh_copies

    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        return m(*fresh_copies(inputs))


def _float_tensors(value) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(value) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _check_traced_equals_model(model: nn.Module, dm: "DynamicModel") -> None:
    """At full width the eval-mode DynamicModel must compute what ``model`` computes, or
    every later check (export against the gated model) compares with the wrong function.

    Why a check by numbers: torch.fx records some Python it cannot see differently from
    eager PyTorch, and nothing in the graph shows it — ``identity = x; x += y`` becomes
    ``x = x + y`` (``identity`` keeps the old value, unlike eager), a value read from
    an attribute that changes between calls is frozen. Both runs draw the same random
    numbers (one seed, forked RNG), on fresh copies of the example inputs, with a copy of
    the user's model (its forward may write its own state), in eval mode."""
    from .export import _float64_dm
    from .numcheck import agreement, float64_copy, to_float64
    from .trace import _deepcopy

    reference = _deepcopy(model).eval()
    with eval_mode(dm):
        want, got = _seeded_run(reference, dm.example_inputs), _seeded_run(dm, dm.example_inputs)
        if not all(torch.isfinite(t).all() for t in _float_tensors(want)):
            raise TraceError("your model's output on the example inputs holds NaN or inf (before dcopt changed "
                             "anything): every rewrite is checked by numbers on these inputs, which NaN cannot "
                             "pass", suggestion="Pass example inputs on which the model's output is finite "
                             "(e.g. a std over a dim of length 1 is NaN)")
        verdict = agreement(want, got, FIDELITY_TOL, lambda: (
            _seeded_run(float64_copy(reference), to_float64(dm.example_inputs)),
            _seeded_run(_float64_dm(dm).eval(), to_float64(dm.example_inputs))))
    if not verdict.ok:
        raise TraceError(
            f"the traced model does not compute what the model computes on the example inputs "
            f"({verdict.describe(FIDELITY_TOL)}), before dcopt changed any width. torch.fx records some "
            f"Python differently from eager PyTorch: `x += y` while another name still refers to x "
            f"(write x = x + y, or x.add_(y)), values read from attributes that change between calls, "
            f"control flow on tensor values. Mark the block as a leaf (leaf_modules=[...]) or rewrite it")


def _check_same_gradients(model: nn.Module, dm: "DynamicModel", sites: list[str]) -> None:
    """TraceError where the converted model would train a parameter the user's model
    gives no gradient (or the reverse). The forward switches gradients off somewhere
    (``sites``: ``torch.no_grad()``, ``set_grad_enabled``, ``inference_mode``), which
    torch.fx does not record: the traced graph computes every gradient. That matters only
    where it reaches a parameter (a frozen feature extractor); a mask computed under
    ``no_grad`` from the inputs changes nothing, so it is measured, not assumed: one
    backward of both models (copies, eval mode, full width) on the example inputs."""
    import copy

    from .numcheck import fresh_copies
    from .trace import _deepcopy

    def trained(m: nn.Module, names) -> set[str]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            outs = _float_tensors(m(*fresh_copies(dm.example_inputs)))
            gen = torch.Generator().manual_seed(1)
            loss = sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum() for t in outs
                       if t.requires_grad)
        if isinstance(loss, torch.Tensor):
            loss.backward()
        return {names.get(n, n) for n, p in m.named_parameters()
                if p.grad is not None and bool(p.grad.ne(0).any())}

    gated = copy.deepcopy(dm).eval()
    # the converted model's parameter names: under gm., an RNN's inside its GatedRNN
    names = {}
    wrapped = [(f"{q}." if q else "", {id(p) for p in mod.inner.parameters()})
               for q, mod in gated.gm.named_modules() if isinstance(mod, (GatedRNN, MaskedNorm))]
    for n, p in gated.named_parameters():
        plain = n.removeprefix("gm.")
        for q, inner in wrapped:
            if id(p) in inner:   # "<q>.<inner attr>.<name>" is "<q>.<name>" in the user's model
                plain = q + plain[len(q):].split(".", 1)[1]
        names[n] = plain
    common = {n for n, _ in model.named_parameters()} & set(names.values())
    where = "; ".join(source_location(s) or s for s in sites)
    try:
        want = trained(_deepcopy(model).eval(), {}) & common
    except RuntimeError as exc:   # inference_mode tensors reaching autograd: the user's model cannot train
        raise TraceError(f"the forward switches gradients off ({where}) and your model cannot be trained as it "
                         f"is ({_first_line(str(exc)) or type(exc).__name__}); torch.fx does not record the "
                         "switch, so the converted model would train differently", suggestion="Use torch.no_grad() or requires_grad_(False), "
                         "or make the block a leaf (leaf_modules=[...])") from exc
    got = trained(gated, names) & common
    if want != got:
        differ = sorted(got ^ want)
        listed = ", ".join(differ[:5]) + (f" and {len(differ) - 5} more" if len(differ) > 5 else "")
        raise TraceError(
            f"the forward switches gradients off ({where}) and torch.fx does not record that: the converted "
            f"model would compute gradients your model does not ({listed}), so training would change "
            f"parameters your model keeps frozen",
            suggestion="Freeze those parameters with requires_grad_(False) instead (the converted model keeps "
                       "that), or make the block that switches gradients off a leaf (leaf_modules=[...]: it "
                       "then runs its own forward, and its widths stay fixed)")


def _train_mode_differs(model: nn.Module, dm: "DynamicModel") -> bool:
    """Whether the fixed-phase DynamicModel in train mode computes something else than
    ``model`` in train mode on the example inputs (same RNG; copies, since a train-mode
    forward updates BatchNorm statistics). Asked only where the train-mode trace differs
    from the eval-mode one: a difference fx sees (``training=self.training`` passed to a
    dropout of p = 0, as Swin does) need not change any number. A train-mode forward that
    fails (a batch of 1 through BatchNorm) counts as different: nothing shows otherwise."""
    import copy

    from .numcheck import max_relative_error
    from .trace import _deepcopy

    try:
        gated = copy.deepcopy(dm)
        gated.fix_sizes()
        want = _seeded_run(_deepcopy(model).train(), dm.example_inputs)
        got = _seeded_run(gated.train(), dm.example_inputs)
        return not max_relative_error(want, got) <= FIDELITY_TOL
    except Exception:  # noqa: BLE001
        return True


class LazyDynamicModel(nn.Module):
    """A DynamicModel whose conversion waits for the first batch (shapes come from it)."""

    def __init__(self, model: nn.Module, config: Config):
        super().__init__()
        from .trace import _deepcopy

        object.__setattr__(self, "_pending", (_deepcopy(model), config))
        self.inner: Optional[DynamicModel] = None

    def _apply(self, fn, recurse=True):
        """Before the first batch, ``.to(dtype)`` / ``.to(device)`` reach the (private copy of
        the) model waiting to be converted, as torch's Lazy modules honour them."""
        if self.inner is None:
            self._pending[0]._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def forward(self, *args, **kwargs):
        if self.inner is None:
            if kwargs:
                raise TypeError("the first call of a lazily converted model takes positional inputs only")
            model, cfg = self._pending
            self.inner = convert(model, tuple(a.detach() for a in args), cfg)
            self.inner.train(self.training)
        return self.inner(*args, **kwargs)

    def _settled(self) -> "DynamicModel":
        if self.inner is None:
            raise RuntimeError("this model converts on its first forward call; run one batch through it "
                               "first (its state does not exist before)")
        return self.inner

    def state_dict(self, *args, **kwargs):
        """The converted model's state, with the same keys as an eagerly converted one
        (``convert(model, example_inputs)``), so either loads the other's and ``dcopt export``
        reads it."""
        return self._settled().state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self._settled().load_state_dict(state_dict, strict=strict, assign=assign)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self._modules.get("inner")
            if inner is None:
                raise AttributeError(f"{name!r}: this model converts on its first forward call; "
                                     "run one batch through it first") from None
            return getattr(inner, name)


def as_dynamic_model(model, caller: str) -> DynamicModel:
    """The :class:`DynamicModel` behind ``model`` (a lazily converted one once it has run a
    batch), or a ``TypeError`` naming ``caller`` for anything else. One place, so export,
    fit and reorder accept and refuse the same things with the same words."""
    dm = model._settled() if isinstance(model, LazyDynamicModel) else model
    if not isinstance(dm, DynamicModel):
        raise TypeError(f"{caller} expects a DynamicModel (from dcopt.convert), got {type(model).__name__}")
    return dm
