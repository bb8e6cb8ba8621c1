"""Op rules, one module per family; importing this package fills :data:`REGISTRY`."""
from .registry import REGISTRY, RuleRegistry, register_rule
from . import containers, modules, elementwise, matmul, attention, einsum, reduce, shape, transformer  # noqa: F401  (registration side effects)

__all__ = ["REGISTRY", "RuleRegistry", "register_rule"]
