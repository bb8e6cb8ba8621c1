"""The rule registry: op knowledge, one small rule per op family.

A rule is a function ``rule(ctx) -> value`` that, given the feature maps of a node's
inputs (``ctx.fmap(arg)``), returns the feature map(s) of its output and declares what
the op means for conversion and export (``ctx.new_group``, ``ctx.gate``,
``ctx.plan_param``, ``ctx.reject`` ...). Rules are looked up by module type (along the
MRO, so a subclass of ``nn.Linear`` that only changes ``__init__`` is still a Linear;
one that redefines a method the base runs is not), by function object, or by method
name. An op with no rule is never assumed channel-preserving: the analysis rejects the
groups that reach it, naming the op.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

__all__ = ["RuleRegistry", "REGISTRY", "register_rule", "Rule", "NAMEDTUPLE"]

#: the registry key of the rule for a user-defined namedtuple class called as a function
#: (fx writes ``T(a, b)`` for a namedtuple passed on); each class is its own target
NAMEDTUPLE = object()

Rule = Callable[[Any], Any]


class RuleRegistry:
    def __init__(self):
        self.modules: dict[type, Rule] = {}
        #: rules for module classes named "package.module.Class", matched without importing
        #: the package (torchvision's StochasticDepth would cost every `import dcopt` seconds)
        self.modules_by_name: dict[str, Rule] = {}
        self.functions: dict[Any, Rule] = {}
        self.methods: dict[str, Rule] = {}

    def register(self, *keys, rule: Optional[Rule] = None):
        """Register ``rule`` for module types, functions or method names (strings).

        Usable as a decorator: ``@register_rule(nn.Linear)``.
        """
        def add(fn: Rule) -> Rule:
            for key in keys:
                if isinstance(key, str):
                    self.methods[key] = fn
                elif isinstance(key, type) and issubclass(key, nn.Module):
                    self.modules[key] = fn
                else:
                    self.functions[key] = fn
            return fn

        return add(rule) if rule is not None else add

    def for_module(self, module: nn.Module) -> Optional[Rule]:
        """The rule of the nearest registered class in the MRO — unless the module computes
        something else: its class overrides ``forward`` or, below torch, any method of the
        registered class (:func:`overrides_base`); then no rule applies and the module is
        an unknown op. A module whose weights are computed (:func:`computed_tensors`)
        gets a rule that keeps it fixed: the registered rule would plan slices of tensors
        that are not its Parameters."""
        forward = type(module).forward
        for cls in type(module).__mro__:
            rule = self.modules.get(cls) or self.modules_by_name.get(f"{cls.__module__}.{cls.__qualname__}")
            if rule is not None:
                if cls.forward is not forward or overrides_base(type(module), cls):
                    return None
                return _keeps_computed_fixed if computed_tensors(module) else rule
        return None

    def for_function(self, fn) -> Optional[Rule]:
        rule = self.functions.get(fn)
        if rule is None and _user_namedtuple(fn):
            rule = self.functions.get(NAMEDTUPLE)
        return rule

    def for_method(self, name: str) -> Optional[Rule]:
        return self.methods.get(name)


def _user_namedtuple(fn) -> bool:
    """A namedtuple class of the user's. torch's own (``PackedSequence``, which an RNN
    reads as a whole) are not plain containers."""
    return (isinstance(fn, type) and issubclass(fn, tuple) and hasattr(fn, "_fields")
            and not fn.__module__.split(".")[0] == "torch")


#: methods a subclass may define without changing what the registered class computes
_HARMLESS = frozenset({"__init__", "extra_repr", "reset_parameters", "__repr__", "__setstate__", "__getstate__",
                       "_check_input_dim", "_load_from_state_dict", "_save_to_state_dict"})


def overrides_base(cls: type, base: type) -> bool:
    """Whether a class between ``cls`` and ``base`` (outside torch) redefines something
    ``base`` has — ``_conv_forward`` of a weight-standardised conv, ``__getattr__``...:
    the forward then runs the subclass's code, which ``base``'s rule does not describe.
    torch's own subclasses (``BatchNorm2d`` of ``_BatchNorm``) are the base's family."""
    for c in cls.__mro__:
        if c is base:
            return False
        if c.__module__.split(".")[0] == "torch":
            continue
        for name, attr in vars(c).items():
            if name in _HARMLESS or not hasattr(base, name):
                continue
            if callable(attr) or isinstance(attr, (property, staticmethod, classmethod)):
                return True
    return False


def computed_tensors(module: nn.Module) -> Optional[str]:
    """Why ``module``'s weights are not its own Parameters (None when they are): a
    parametrization computes them on every access (``parametrizations.weight_norm``,
    ``spectral_norm``), or a forward pre-hook writes a plain tensor attribute before each
    call (``nn.utils.prune``, the old ``nn.utils.weight_norm``). Slicing the Parameter a
    rule names would slice nothing, or the wrong thing."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(module):
        names = ", ".join(module.parametrizations.keys())
        return f"its {names} is computed by a parametrization (weight_norm, spectral_norm, ...)"
    plain = [k for k, v in vars(module).items() if isinstance(v, torch.Tensor)]
    if plain:
        return (f"its {', '.join(plain)} is a plain tensor a hook recomputes before each call "
                "(nn.utils.prune: make it permanent with prune.remove(module, name) first; "
                "old nn.utils.weight_norm: use remove_weight_norm or parametrizations.weight_norm)")
    return None


def _keeps_computed_fixed(ctx):
    """The rule of a registered layer whose weights are computed: a fixed layer."""
    why = computed_tensors(ctx.module)
    for _, fm in ctx.tracked_args():
        ctx.reject(fm, f"dcopt cannot slice {type(ctx.module).__name__} {ctx.target}: {why}; "
                       "it keeps its width")
    ctx.macs()  # its MACs stay as counted: nothing of it is sliced (and no second reason)
    return None


REGISTRY = RuleRegistry()


def register_rule(*keys, rule: Optional[Rule] = None):
    """Teach dcopt an op: ``@dcopt.register_rule(MyLayer)`` on a function ``rule(ctx)``.

    Example — a custom per-channel scale layer whose weight has shape (C,)::

        @dcopt.register_rule(MyScale)
        def _(ctx):
            fm = ctx.fmap(ctx.node.args[0])
            if fm is not None:
                ctx.plan_param("weight", (fm.pos,))
            return fm
    """
    return REGISTRY.register(*keys, rule=rule)
