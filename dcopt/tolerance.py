"""Tolerance mode: the user names the price in loss, not β (GitHub issue 9).

``fit(dm, ..., tolerance=0.02)`` solves

    minimise   complexity(sizes)
    subject to task_loss ≤ (1 + tolerance) · reference

where ``reference`` is the task loss at the end of the fixed phase (full width, weights
converged): on ``val_data`` when given (eval mode, what the exported model computes),
else a running average (EMA) of the training loss. β — the weight of the complexity term
in ``dm.complexity_loss()`` — is the Lagrange multiplier of that constraint, adapted by
dual ascent in log space once per epoch of the optimize phase:

    u = ((1 + tol)·ref − L) / (tol·ref)       slack in units of the tolerance:
                                              1 at L = ref, 0 on the bound, −1 at (1 + 2 tol)·ref
    log β ← log β + rate · clip(u, −max_violation, 1)
    β     ← clip(β, β_min, β_max)

So β grows (by at most ``e^rate`` an epoch) while the constraint holds with slack and
shrinks (by up to ``e^(rate·max_violation)``) when it is violated: shrinking is allowed to
be faster than growing, because a size pushed past the point where the task needs it
costs accuracy at once, while one left a little too large only costs MACs. Working in
log space makes the update scale-free: β's start, ``tol·ref·beta_init`` (the complexity
term at full width then equals ``beta_init`` times the loss the user allows to lose),
sets the units, and the bounds are multiples of it.

The controller is plain Python with no torch state; :func:`dcopt.fit` calls
:meth:`ToleranceController.update` once per optimize epoch and copies the result into
``dm.beta``. Using it in your own loop::

    ctl = ToleranceController(0.02)
    ctl.set_reference(val_loss_after_fixed_phase)
    dm.beta.fill_(ctl.beta)
    for epoch in range(optimize_epochs):
        ...                                   # train with task + dm.complexity_loss()
        dm.beta.fill_(ctl.update(val_loss))   # once per epoch
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

__all__ = ["ToleranceController", "ToleranceStep", "LossAverage"]


@dataclass(frozen=True)
class ToleranceStep:
    """One controller update. ``loss``: the estimate it was given; ``judged``: the lowest
    of the last ``patience + 1`` estimates, which the slack ``u`` is computed from;
    ``feasible``: this epoch's loss is within the bound (its sizes are a safe fallback);
    ``backtrack``: the judged slack is below ``backtrack_slack`` — a large violation that
    persists: the sizes overshot and should go back to the last feasible ones;
    ``overshoot``: this epoch's own slack is below ``backtrack_slack``."""
    loss: float
    judged: float
    bound: float
    slack: float
    beta: float
    feasible: bool
    backtrack: bool
    overshoot: bool


@dataclass
class ToleranceController:
    """β as a Lagrange multiplier for "smallest model within ``tolerance`` of the reference loss".

    tolerance:      allowed relative loss increase, e.g. 0.02 for 2 %.
    reference:      the full model's converged loss; ``None`` until :meth:`set_reference`
                    (``fit`` sets it at the end of the fixed phase).
    rate:           log-β step per update at full slack (u = 1): β grows by at most e^rate.
    max_violation:  the slack is clipped to [−max_violation, 1]: β shrinks by at most
                    e^(rate·max_violation) per update.
    patience:       the dual step judges the constraint on the lowest of the last
                    ``patience + 1`` losses: a one-epoch spike (a size just dropped a
                    feature and the weights have not caught up) does not cut β, a
                    violation that persists does.
    backtrack_slack: a judged slack below this (default −1: loss above (1 + 2·tol)·ref)
                    asks ``fit`` to put the sizes back to the last feasible epoch's. A
                    size pushed well past what the task needs cannot come back by
                    gradient (the consumers stop using its noisy boundary feature, so its
                    gradient vanishes); small violations are left to the dual step.
    beta_init:      start β = beta_init · tolerance · reference (before calibration).
    beta_range:     (lo, hi) multiples of tolerance · reference that bound β.
    """
    tolerance: float
    reference: Optional[float] = None
    rate: float = 0.3
    max_violation: float = 3.0
    patience: int = 1
    backtrack_slack: float = -1.0
    beta_init: float = 1.0
    beta_range: tuple = (1e-3, 1e6)
    beta: Optional[float] = None
    calibrated: bool = False
    steps: list = field(default_factory=list)
    _recent: list = field(default_factory=list, repr=False)

    def __post_init__(self):
        if not (isinstance(self.tolerance, (int, float)) and 0.0 < self.tolerance < 10.0):
            raise ValueError(f"tolerance is a relative loss increase in (0, 10), e.g. 0.02; got {self.tolerance!r}")
        if int(self.patience) != self.patience or self.patience < 0:
            raise ValueError(f"patience must be a non-negative integer, got {self.patience!r}")
        if self.rate <= 0 or self.max_violation <= 0 or self.beta_init <= 0:
            raise ValueError(f"rate, max_violation and beta_init must be > 0; got {self.rate}, "
                             f"{self.max_violation}, {self.beta_init}")
        lo, hi = self.beta_range
        if not 0 < lo <= 1 <= hi:
            raise ValueError(f"beta_range must be (lo, hi) with 0 < lo <= 1 <= hi, got {self.beta_range!r}")
        if self.reference is not None:
            self.set_reference(self.reference)

    # -- reference ------------------------------------------------------------------------
    def set_reference(self, loss: float) -> float:
        """Fix the reference loss (the full model's); starts β at ``beta_init·tol·ref``.
        Returns β."""
        loss = float(loss)
        if not math.isfinite(loss) or loss <= 0:
            raise ValueError(f"the reference loss must be finite and > 0, got {loss}")
        self.reference = loss
        if self.beta is None:
            self.beta = self.beta_init * self.tolerance * loss
        self.beta = self._clip(self.beta)
        return self.beta

    @property
    def bound(self) -> float:
        """The largest loss the constraint allows: (1 + tolerance) · reference."""
        self._need_reference()
        return (1.0 + self.tolerance) * self.reference

    @property
    def beta_bounds(self) -> tuple[float, float]:
        self._need_reference()
        unit = self.beta_init * self.tolerance * self.reference
        return unit * self.beta_range[0], unit * self.beta_range[1]

    def _need_reference(self):
        if self.reference is None:
            raise RuntimeError("no reference loss yet: call set_reference(loss) (fit does it after the fixed phase)")

    def _clip(self, beta: float) -> float:
        lo, hi = self.beta_bounds
        return float(min(hi, max(lo, beta)))

    # -- the dual step --------------------------------------------------------------------
    def slack(self, loss: float) -> float:
        """u = (bound − loss)/(tol·ref): 1 at the reference, 0 on the bound, < 0 violated."""
        self._need_reference()
        return (self.bound - float(loss)) / (self.tolerance * self.reference)

    def feasible(self, loss: float) -> bool:
        return float(loss) <= self.bound

    def calibrate(self, balance_beta: float) -> float:
        """Raise β (once) to where the regularizer's push on κ balances the task's pull at
        the current sizes — the β at which sizes begin to move — so the dual ascent does
        not spend its first epochs growing β through values that move nothing. ``fit``
        calls it after the first optimize epoch with min over groups of
        −(d task/dκ) / (d complexity/dκ per unit β). Returns β."""
        self._need_reference()
        if not self.calibrated and math.isfinite(balance_beta) and balance_beta > 0:
            self.beta = self._clip(max(self.beta, float(balance_beta)))
            self.calibrated = True
        return self.beta

    def update(self, loss: float) -> float:
        """One dual-ascent step from a task-loss estimate; returns the new β.
        A non-finite loss counts as the worst violation."""
        self._need_reference()
        loss = float(loss) if math.isfinite(float(loss)) else math.inf
        self._recent = (self._recent + [loss])[-(self.patience + 1):]
        judged = min(self._recent)
        u = self.slack(judged) if math.isfinite(judged) else -self.max_violation
        step = self.rate * min(1.0, max(-self.max_violation, u))
        self.beta = self._clip(self.beta * math.exp(step))
        own = self.slack(loss) if math.isfinite(loss) else -math.inf
        self.steps.append(ToleranceStep(loss=loss, judged=judged, bound=self.bound, slack=u, beta=self.beta,
                                        feasible=loss <= self.bound, backtrack=u < self.backtrack_slack,
                                        overshoot=own < self.backtrack_slack))
        return self.beta


class LossAverage:
    """Exponential moving average of the training loss, the constraint's estimate when
    no ``val_data`` is given. ``halflife`` in steps (fit uses a quarter epoch); bias
    corrected as in Adam, so the first values are not pulled towards 0."""

    def __init__(self, halflife: float):
        if halflife <= 0:
            raise ValueError(f"halflife must be > 0, got {halflife}")
        self.decay = 0.5 ** (1.0 / halflife)
        self._avg = 0.0
        self._weight = 0.0

    def add(self, value: float) -> None:
        self._avg = self.decay * self._avg + (1 - self.decay) * float(value)
        self._weight = self.decay * self._weight + (1 - self.decay)

    @property
    def value(self) -> Optional[float]:
        return self._avg / self._weight if self._weight > 0 else None
