"""Tolerance mode: the user names the price in loss, not β (GitHub issue 9).

``fit(dm, ..., tolerance=0.02)`` looks for

    the smallest model   subject to   task_loss ≤ (1 + tolerance) · reference

where ``reference`` is the task loss at the end of the fixed phase (full width, weights
converged): on ``val_data`` when given (eval mode: what the exported model computes),
else a running average (EMA) of the training loss. β — the weight of the complexity term
in ``dm.complexity_loss()``, for either regularizer — is the Lagrange multiplier of that
constraint, adapted by dual ascent in log space once per optimize epoch.

The dual step
-------------
With the slack measured in tolerances,

    u = ((1 + tol)·ref − L) / (tol·ref)      1 at L = ref, 0 on the bound, −1 one tolerance above it

the step on log β is

    rate · min(u, 1)                         u ≥ 0       (slack: grow, at most e^rate an epoch)
    0                                        −hold ≤ u < 0
    rate · max(u + hold, −max_violation)     u < −hold   (violated: shrink)

and β stays within ``beta_range`` (multiples of tol·ref). Three refinements, each for
something measured on the filter-bank task and the planted-rank toy:

* **hold band.** The constraint is on the final model but can only be measured on the
  moving one. While a size shrinks, the weights lag (they need time to move information
  out of the feature being removed), and the measured loss sits above what the same sizes
  reach once the weights catch up (the settle phase). So β merely stops growing for
  violations up to ``hold`` tolerances; a size the task really needs costs far more than
  that (filter bank at 30–31 of the 32 features it needs: +13 % to +30 %), and β
  shrinks. Measured effect on the dual step: small (``hold=0`` gives the same sizes on
  both tasks, toy 8–10, filter bank 32–33). It matters for the end-of-phase check below:
  with a strict check, one toy run that sat at 8 features just above the bound went back
  to its last feasible sizes, 14.
* **patience.** u is computed from the lowest of the last ``patience + 1`` losses: the
  one-epoch spike when a size has just dropped a feature does not cut β.
* **backtracking** (done by ``fit``, decided here: ``ToleranceStep.backtrack``). A size
  pushed well past what the task needs cannot come back by gradient: the consumers stop
  using its noisy boundary feature, so the task's pull on κ vanishes (measured: κ stuck at
  30 of 64 with β → 0). When the judged slack falls below ``backtrack_slack``, or has
  stayed beyond the hold band for ``persist`` epochs in a row (a smaller overshoot that
  shrinking β did not cure: the sizes went on shrinking), ``fit`` puts the sizes back to
  those of the last epoch that met the bound, and β drops to
  e^(−rate·max_violation) times the β that epoch ran with (the overshoot started from
  there). Then the sizes *recover*: ``fit`` freezes them and β holds, for up to
  ``recovery_epochs`` epochs or until an epoch meets the bound again, while the weights
  re-learn the features that came back (without it the still-large β pushed the restored
  sizes straight down again, epoch after epoch). At the end of the optimize phase ``fit``
  also goes back if the last epoch's loss is beyond the hold band, so the final sizes met
  the bound, or were within a transient of it, while they were still moving.

Where the loss jumps at the right size (the filter bank at 32 features, the toy at 8),
the constraint is slack just above it, so dual ascent keeps probing below it: β grows
until a size slips through, the controller backtracks, and so on. The final sizes are
unaffected (backtracking and the end-of-phase check), but each probe costs a few epochs
of a perturbed model. ``backoff`` < 1 makes β grow that many times slower after each
backtrack: 0.5 cut the backtracks on the filter bank from 9–10 to 3–5 per run, but it also
slows the descent after a backtrack caused by an early transient (toy: 2 of 4 runs ended
at 14 and 16 features instead of 8–9), so it is off (1.0) by default.

β starts at ``beta_init · tol · ref`` and, after the first optimize epoch, jumps to the
value where the regularizer's push on κ beats the task's pull by ``calibration_noise``
per-step standard deviations of that pull (:meth:`calibrate`): the β at which sizes begin
to move at a useful speed, whatever the loss's units.

Using it in your own loop::

    ctl = ToleranceController(0.02)
    ctl.set_reference(val_loss_after_fixed_phase)
    dm.beta.fill_(ctl.beta)
    for epoch in range(optimize_epochs):
        ...                                   # train with task + dm.complexity_loss()
        dm.beta.fill_(ctl.update(val_loss))   # once per epoch
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional

__all__ = ["ToleranceController", "ToleranceStep", "LossAverage", "balance_beta", "loss_drift", "loss_jitter"]


@dataclass(frozen=True)
class ToleranceStep:
    """One controller update. ``loss``: the estimate it was given; ``judged``: the lowest
    of the last ``patience + 1`` estimates, which the slack ``slack`` (u) comes from;
    ``log_step``: the change of log β; ``feasible``: this epoch's own loss meets the bound
    (its sizes are a safe fallback); ``backtrack``: u < ``backtrack_slack``, the sizes
    overshot and should go back to the last feasible ones; ``in_band``: this epoch's own
    loss is at most ``hold`` tolerances above the bound (a transient the settle phase is
    expected to remove; fit ends the optimize phase on such sizes, on worse ones it goes
    back); ``recovering``: keep the sizes frozen during the next epoch (β holds meanwhile)."""
    loss: float
    judged: float
    bound: float
    slack: float
    log_step: float
    beta: float
    feasible: bool
    backtrack: bool
    in_band: bool = True
    recovering: bool = False


@dataclass
class ToleranceController:
    """β as a Lagrange multiplier for "smallest model within ``tolerance`` of the reference loss".

    tolerance:       allowed relative loss increase, e.g. 0.02 for 2 %.
    reference:       the full model's converged loss; ``None`` until :meth:`set_reference`
                     (``fit`` sets it at the end of the fixed phase).
    rate:            log-β step per update at full slack: β grows by at most e^rate.
    hold:            width of the band above the bound, in tolerances, where β holds.
    max_violation:   β shrinks by at most e^(rate·max_violation) per update.
    patience:        judge the constraint on the lowest of the last patience + 1 losses.
    backtrack_slack: a judged slack below this (default −2: loss above (1 + 3·tol)·ref)
                     sets ``backtrack`` on the step.
    recovery_epochs: after a backtrack, at most this many epochs with frozen sizes and β.
    persist:         also backtrack when the judged slack has stayed beyond the hold band
                     (below −hold) for this many updates in a row (0: off). A violation that
                     shrinking β has not cured in that time is an overshoot too, only a
                     smaller one (VAD CRNN, seed 1, 5 %, a one-off run before this option:
                     7 epochs 1.7–2 tolerances over the bound while β fell ×0.8 an epoch and
                     a conv group still shrank, 49 → 42 of 64 channels).
    backoff:         after a backtrack β grows this many times as fast as before (≥ rate/8).
    calibration_noise: :meth:`calibrate` puts β where the net push on κ exceeds the task's
                     mean pull by this many per-step standard deviations of the pull (0: where
                     the means balance; on the VAD CRNN that left β 6× (frequency-ordered
                     bands) and 18× (spread order, 5 %, seed 0) below where the sizes began
                     to move: docs/tolerance.md).
    start_boost:     while every size is still at full width (``update(..., full_width=True)``)
                     β grows this many times as fast (off: 1). Meant for the epochs spent
                     below the β where sizes begin to move (VAD CRNN: 7 of 24 optimize
                     epochs); measured there at 3 (one-off runs, docs/tolerance.md), it found smaller models at 1 % but the
                     two tolerances' sizes nearly met on one seed (67 % and 63 % of the
                     MACs) and EER rose at 5 % on both, so it is off by default.
    beta_init:       start β = beta_init · tolerance · reference (before :meth:`calibrate`).
    beta_range:      (lo, hi) multiples of tolerance · reference that bound β.
    """
    tolerance: float
    reference: Optional[float] = None
    rate: float = 0.3
    hold: float = 1.0
    max_violation: float = 3.0
    patience: int = 1
    backtrack_slack: float = -2.0
    recovery_epochs: int = 3
    persist: int = 3
    backoff: float = 1.0
    calibration_noise: float = 0.25
    start_boost: float = 1.0
    beta_init: float = 1.0
    beta_range: tuple = (1e-3, 1e6)
    beta: Optional[float] = None
    calibrated: bool = False
    steps: list = field(default_factory=list)
    _recent: list = field(default_factory=list, repr=False)
    _feasible_beta: Optional[float] = field(default=None, repr=False)
    _recovering: int = field(default=0, repr=False)
    _growth: Optional[float] = field(default=None, repr=False)
    _violated: int = field(default=0, repr=False)

    def __post_init__(self):
        if isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float)) \
                or not 0.0 < self.tolerance < 10.0:
            raise ValueError(f"tolerance is a relative loss increase in (0, 10), e.g. 0.02; got {self.tolerance!r}")
        from .config import _require_finite
        for name in ("backoff", "start_boost", "calibration_noise", "rate", "max_violation", "beta_init", "hold",
                     "backtrack_slack"):
            _require_finite(name, getattr(self, name))
        if not 0 < self.backoff <= 1:
            raise ValueError(f"backoff must be in (0, 1], got {self.backoff}")
        if not self.start_boost >= 1:
            raise ValueError(f"start_boost must be >= 1, got {self.start_boost}")
        if not self.calibration_noise >= 0:
            raise ValueError(f"calibration_noise must be >= 0, got {self.calibration_noise}")
        if self.rate <= 0 or self.max_violation <= 0 or self.beta_init <= 0 or self.hold < 0:
            raise ValueError(f"rate, max_violation and beta_init must be > 0 and hold >= 0; got {self.rate}, "
                             f"{self.max_violation}, {self.beta_init}, {self.hold}")
        for name in ("patience", "recovery_epochs", "persist"):
            n = getattr(self, name)
            if int(n) != n or n < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {n!r}")
        if self.backtrack_slack > -self.hold:
            raise ValueError(f"backtrack_slack ({self.backtrack_slack}) must be <= -hold ({-self.hold}): "
                             "backtrack only where β already shrinks")
        lo, hi = self.beta_range
        if not 0 < lo <= 1 <= hi:
            raise ValueError(f"beta_range must be (lo, hi) with 0 < lo <= 1 <= hi, got {self.beta_range!r}")
        if self.reference is not None:
            self.set_reference(self.reference)

    # -- reference ------------------------------------------------------------------------
    def set_reference(self, loss: float) -> float:
        """Fix the reference loss (the full model's); β starts at ``beta_init·tol·ref``
        unless it was set. Returns β."""
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
        unit = self.tolerance * self.reference
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
        loss = float(loss)
        return (self.bound - loss) / (self.tolerance * self.reference) if math.isfinite(loss) else -math.inf

    def feasible(self, loss: float) -> bool:
        return float(loss) <= self.bound

    def log_step(self, u: float) -> float:
        """The change of log β for slack u (see the module docstring)."""
        if u >= 0:
            return (self.rate if self._growth is None else self._growth) * min(u, 1.0)
        if u >= -self.hold:
            return 0.0
        return self.rate * max(u + self.hold, -self.max_violation)

    def calibrate(self, balance_beta: float) -> float:
        """Raise β (once) to where the regularizer's push on κ beats the task's pull at
        the current sizes — the β at which sizes begin to move at a useful speed — so the
        dual ascent does not spend its first epochs growing β through values that move
        nothing. ``fit`` calls it after the first optimize epoch with the smallest over
        groups of (−mean(d task/dκ) + calibration_noise·std(d task/dκ)) / (d complexity/dκ
        per unit β). 0 means some size already moves: nothing to raise. Returns β."""
        self._need_reference()
        if not self.calibrated and math.isfinite(balance_beta) and balance_beta >= 0:
            self.beta = self._clip(max(self.beta, float(balance_beta)))
            self.calibrated = True
        return self.beta

    def update(self, loss: float, full_width: bool = False) -> float:
        """One dual-ascent step from a task-loss estimate; returns the new β.
        A non-finite loss counts as the worst violation. ``full_width``: no size has left
        its full width yet (β then grows ``start_boost`` times as fast, until the first
        backtrack)."""
        self._need_reference()
        loss = float(loss) if math.isfinite(float(loss)) else math.inf
        self._recent = (self._recent + [loss])[-(self.patience + 1):]
        judged = min(self._recent)
        u = self.slack(judged)
        before = self.beta
        feasible = loss <= self.bound
        if feasible:
            self._recovering = 0
            self._feasible_beta = before
        self._violated = self._violated + 1 if u < -self.hold and not self._recovering else 0
        backtrack = u < self.backtrack_slack or 0 < self.persist <= self._violated
        if backtrack:
            self._violated = 0              # counted afresh from the sizes fit goes back to
        if self._recovering > 0:            # sizes frozen after a backtrack: β holds too
            self._recovering -= 1
            backtrack = False
        else:
            step = self.log_step(u)
            if full_width and step > 0 and self._growth is None:
                step *= self.start_boost
            self.beta = self._clip(self.beta * math.exp(step))
            if backtrack and self._feasible_beta is not None:
                # the sizes go back to the last feasible epoch's; β goes below the β that
                # epoch ran with, which is where the overshoot started from
                cut = self._feasible_beta * math.exp(-self.rate * self.max_violation)
                self.beta = self._clip(min(self.beta, cut))
                self._recovering = self.recovery_epochs
                self._growth = max(self.rate / 8, (self._growth or self.rate) * self.backoff)
        self.steps.append(ToleranceStep(loss=loss, judged=judged, bound=self.bound, slack=u,
                                        log_step=math.log(self.beta / before), beta=self.beta,
                                        feasible=feasible, backtrack=backtrack,
                                        in_band=self.slack(loss) >= -self.hold,
                                        recovering=self._recovering > 0))
        return self.beta

    # -- resuming (fit(..., checkpoint=...)) --------------------------------------------
    _PROGRESS = ("reference", "beta", "calibrated", "_recent", "_feasible_beta", "_recovering", "_growth",
                 "_violated")

    def state_dict(self) -> dict:
        """Where the dual ascent stands (plain data; the settings are not included, they
        come from the controller it is loaded into)."""
        out = {name: getattr(self, name) for name in self._PROGRESS}
        out["_recent"] = list(self._recent)
        out["steps"] = [asdict(step) for step in self.steps]
        return out

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`. A state taken before the controller started
        (no reference, no step) changes nothing, so a reference set by the user stays."""
        if state["reference"] is None and not state["steps"]:
            return
        for name in self._PROGRESS:
            setattr(self, name, state[name])
        self._recent = list(self._recent)
        self.steps = [ToleranceStep(**step) for step in state["steps"]]


def balance_beta(rec, beta: float, noise: float = 0.0) -> float:
    """What :meth:`ToleranceController.calibrate` is given: from one optimize epoch's record
    (``task_grad``, ``task_grad_std``, ``complexity_grad`` of :class:`dcopt.train.EpochRecord`),
    the smallest β over groups at which the regularizer's push on κ beats the task's mean
    pull by ``noise`` per-step standard deviations of that pull (``noise=0``: where the
    means balance). Adam moves κ by about lr·(mean gradient)/(RMS gradient) per step, so
    with a pull much noisier than its mean a size only moves at a useful speed once the net
    push is a fair fraction of the spread. inf when no group is pushed; 0 when some group
    already moves at β = 0."""
    out = float("inf")
    if beta <= 0:
        return out
    for name, pull in rec.task_grad.items():
        push = rec.complexity_grad.get(name, 0.0)
        if push > 0:
            need = -pull + noise * rec.task_grad_std.get(name, 0.0)
            out = min(out, max(need, 0.0) / (push / beta))
    return out


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

    def state_dict(self) -> dict:
        return {"decay": self.decay, "avg": self._avg, "weight": self._weight}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self._avg, self._weight = state["decay"], state["avg"], state["weight"]


def loss_drift(losses) -> Optional[float]:
    """Relative change of the mean of the last 3 losses against the 3 before (None with
    fewer than 6): how far the reference is from converged."""
    losses = [float(v) for v in losses]
    if len(losses) < 6:
        return None
    now, before = sum(losses[-3:]) / 3, sum(losses[-6:-3]) / 3
    return (now - before) / before if before > 0 else 0.0


def loss_jitter(losses, window: int = 5) -> Optional[float]:
    """Epoch-to-epoch jitter of a loss, relative to its mean over the last ``window``
    epochs: the largest distance of an epoch's loss from the line through its two
    neighbours (a steadily falling loss has none; :func:`loss_drift` measures the trend).
    None with fewer than 3 losses. When it exceeds the tolerance, the controller cannot
    tell a size that costs loss from noise."""
    last = [float(v) for v in losses][-window:]
    if len(last) < 3:
        return None
    mean = sum(last) / len(last)
    if mean <= 0:
        return 0.0
    return max(abs(b - (a + c) / 2) for a, b, c in zip(last, last[1:], last[2:])) / mean
