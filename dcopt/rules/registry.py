"""The rule registry: op knowledge, one small rule per op family.

A rule is a function ``rule(ctx) -> value`` that, given the feature maps of a node's
inputs (``ctx.fmap(arg)``), returns the feature map(s) of its output and declares what
the op means for conversion and export (``ctx.new_group``, ``ctx.gate``,
``ctx.plan_param``, ``ctx.reject`` ...). Rules are looked up by module type (along the
MRO, so a subclass of ``nn.Linear`` is still a Linear), by function object, or by method
name. An op with no rule is never assumed channel-preserving: the analysis rejects the
groups that reach it, naming the op.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from torch import nn

__all__ = ["RuleRegistry", "REGISTRY", "register_rule", "Rule"]

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
        """The rule of the nearest registered class in the MRO — unless the module's class
        overrides ``forward``: then it computes something else and no rule applies."""
        forward = type(module).forward
        for cls in type(module).__mro__:
            rule = self.modules.get(cls) or self.modules_by_name.get(f"{cls.__module__}.{cls.__qualname__}")
            if rule is not None:
                return rule if cls.forward is forward else None
        return None

    def for_function(self, fn) -> Optional[Rule]:
        return self.functions.get(fn)

    def for_method(self, name: str) -> Optional[Rule]:
        return self.methods.get(name)


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
