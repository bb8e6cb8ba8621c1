"""Helpers for a project's own test suite: keep a model convertible as it evolves.

    from dcopt.testing import assert_convertible

    def test_model_stays_convertible():
        assert_convertible(build_model(), (torch.randn(2, 40, 100),), min_dynamic=0.5)

The same verdict as ``dcopt check`` (see :func:`check_failures`), so a test and the CI
command can never disagree.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

__all__ = ["assert_convertible", "check_failures", "format_rejection"]


def format_rejection(rejection: Any) -> str:
    """``file.py:12: cumsum (node cumsum): no width rule for torch.cumsum [group g0]``."""
    where = f"{rejection.location}: " if getattr(rejection, "location", None) else ""
    node = getattr(rejection, "node", "")
    op = getattr(rejection, "op", "") or node
    node_part = f" (node {node})" if node and node != op else ""
    group = getattr(rejection, "group", "")
    group_part = f" [group {group}]" if group else ""
    return f"{where}{op}{node_part}: {rejection.reason}{group_part}"


def check_failures(analysis: Any, *, strict: bool = False, min_dynamic: float = 0.0) -> list[str]:
    """Why ``analysis`` fails the check, one sentence each; empty when it passes.

    * not convertible (no dynamic group) always fails;
    * ``strict``: any layer rejected as unsupported fails (``analysis.unsupported``);
    * ``min_dynamic``: less than that share of the MACs optimisable fails.
    """
    failures = []
    if not analysis.convertible:
        failures.append("not convertible: no feature group can change width")
    if strict and analysis.unsupported:
        n = len(analysis.unsupported)
        failures.append(f"{n} layer{'s' if n != 1 else ''} rejected as unsupported (--strict)")
    if min_dynamic and analysis.dynamic_fraction < min_dynamic:
        failures.append(f"only {analysis.dynamic_fraction:.1%} of MACs optimisable, "
                        f"below the required {min_dynamic:.1%}")
    return failures


def assert_convertible(model, example_inputs, min_dynamic: float = 0.0, strict: bool = False, *,
                       leaf_modules: Iterable = (), concrete_args: Optional[dict] = None):
    """Raise ``AssertionError`` unless dcopt can convert ``model``; return the Analysis.

    The message lists every rejection with its reason and source line, so a failing test
    says which line of the model broke convertibility.

    >>> a = assert_convertible(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)),
    ...                        (torch.randn(1, 4),))          # doctest: +SKIP
    """
    from . import analyze

    from .numcheck import input_tuple

    analysis = analyze(model, input_tuple(example_inputs), leaf_modules=leaf_modules, concrete_args=concrete_args)
    failures = check_failures(analysis, strict=strict, min_dynamic=min_dynamic)
    if failures:
        lines = [f"{type(model).__name__} fails the dcopt check: " + "; ".join(failures)]
        lines.append(f"  {analysis.dynamic_fraction:.1%} of {analysis.macs:,} MACs optimisable, "
                     f"{sum(g.status == 'dynamic' for g in analysis.groups)} dynamic group(s)")
        if analysis.rejections:
            lines.append("rejections:")
            lines += [f"  - {format_rejection(r)}" for r in analysis.rejections]
        raise AssertionError("\n".join(lines))
    return analysis
