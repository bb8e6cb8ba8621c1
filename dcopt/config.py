"""Conversion options as one validated value object (the torchao way): a misspelt option
(a ``TypeError`` naming it) and out-of-range or non-finite values (a ``ValueError``) fail
at ``convert`` time, not mid-training."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["Config"]


def _require_finite(name: str, value: Any) -> None:
    """A float option must be a finite number: NaN passes every ``x < 0`` check and inf
    every lower bound, and either shows up only as a non-finite loss once the optimize
    phase starts, after the fixed phase has spent its epochs."""
    try:
        ok = math.isfinite(value)
    except (TypeError, ValueError, RuntimeError):  # not a number (RuntimeError: a tensor of many)
        ok = False
    if not ok:
        raise ValueError(f"{name} must be a finite number, got {value!r}")


@dataclass
class Config:
    """Options of :func:`dcopt.convert`.

    kappa_min:    smallest fraction of its width a group may shrink to (paper: 0.125–0.25 safe).
    regularizer:  "l2" — the paper's (β/G)·Σκ²; "macs" — β·MACs(s)/MACs_full, each group
                  weighted by what it really costs.
    beta:         strength of the complexity pressure (start value in budget mode).
    target_macs:  budget mode: a fraction of the full model's MACs to land on; β is then
                  adapted by dual ascent (``dual_lr`` per step) and the pressure is MACs-based,
                  with an augmented-Lagrangian term ρ/2·(f − t)² (``budget_rho``) against overshoot.
    leaf_modules: module types or qualified names fx must not trace into.
    round_to:     kept widths are multiples of this (rounded up, at most the full width N):
                  CPU and GPU kernels run faster on channel counts that fill their vector
                  blocks (8 or 16). Applies wherever an integer size is taken — eval mode,
                  the fixed/settle phases, ``complexity(at="kept")``, ``sizes()``, export —
                  so an eval-mode DynamicModel still equals its export. Default 1 (⌈s⌉).
    strict_trace: fail with TraceError when fx cannot trace a submodule, instead of keeping
                  that submodule as an opaque leaf (full width in and out, parameters kept).
    rnn_noise:    in the optimize phase, also put the feature noise on an RNN boundary unit's
                  *recurrent* influence, per step: every gate reads √λ·h_m(t−1) + √(1−λ)·σ·ν(t)
                  in place of h_m(t−1) (dcopt/rnn_noise.py; the fused kernel still runs, the
                  noise enters through extra input columns). Without it the pull on a hidden
                  size's κ sees only what the next layer reads, about half of what removing the
                  unit costs on the VAD CRNN, and the L2 regularizer starves the RNN (README,
                  "RNN hidden units"). On by default; eval mode is unaffected either way.
    """

    kappa_min: float = 0.125
    regularizer: str = "l2"
    beta: float = 1.0
    target_macs: Optional[float] = None
    dual_lr: float = 0.002
    budget_rho: float = 20.0
    leaf_modules: tuple = ()
    concrete_args: Optional[dict] = None
    strict: bool = False
    strict_trace: bool = False
    round_to: int = 1
    rnn_noise: bool = True

    def __post_init__(self):
        for name in ("kappa_min", "beta", "dual_lr", "budget_rho"):
            _require_finite(name, getattr(self, name))
        if self.target_macs is not None:
            _require_finite("target_macs", self.target_macs)
        if not 0.0 < self.kappa_min <= 1.0:
            raise ValueError(f"kappa_min must be in (0, 1], got {self.kappa_min}")
        if self.regularizer not in ("l2", "macs"):
            raise ValueError(f"regularizer must be 'l2' or 'macs', got {self.regularizer!r}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.target_macs is not None and not 0.0 < self.target_macs <= 1.0:
            raise ValueError(f"target_macs is a fraction of the full MACs in (0, 1], got {self.target_macs}")
        if self.dual_lr <= 0:
            raise ValueError(f"dual_lr must be > 0, got {self.dual_lr}")
        if self.budget_rho < 0:
            raise ValueError(f"budget_rho must be >= 0, got {self.budget_rho}")
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1:
            raise ValueError(f"round_to must be an integer >= 1, got {self.round_to!r}")
        self.leaf_modules = tuple(self.leaf_modules)

    @classmethod
    def build(cls, config: Optional["Config"], options: dict[str, Any]) -> "Config":
        if config is None:
            return cls(**options)
        if options:
            from dataclasses import replace
            return replace(config, **options)
        return config
