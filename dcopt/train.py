"""Training helper: the fixed → optimize → settle schedule with a live progress bar.

:func:`fit` runs the schedule the method needs on a :class:`~dcopt.DynamicModel`:

1. **fixed** (``dm.fix_sizes()``): every group at full width, no noise; only the
   weights train, until the task has (mostly) converged.
2. **optimize** (``dm.optimize_sizes()``): the sizes train jointly with the weights
   under feature noise; the loss is ``task + dm.complexity_loss()``.
3. **settle** (``dm.fix_sizes()`` again, optional): the sizes stay frozen where they
   were learned and the weights fine-tune to the kept widths without noise.

Sizes get their own optimizer parameter group with their own, slower learning rate
(``size_lr``, 3e-4 by default while the weights default to 1e-3). That default is
deliberate — see DESIGN.md, "Size dynamics": on the filter-bank task, sizes that move
as fast as the weights (Adam, lr 1e-2 on κ) are bistable in β (they stay at full width
or collapse to the floor), while sizes slower than the weights can re-adapt (lr 3e-4)
trace a gradual size-vs-β curve. Slow sizes leave the weights time to move the
information out of the noisy boundary feature before the size passes it.

Example::

    dm = dcopt.convert(model, (x[:8],), kappa_min=0.125, beta=8.0)
    hist = dcopt.fit(dm, train_loader, torch.nn.functional.mse_loss,
                     fixed_epochs=10, optimize_epochs=30, settle_epochs=5, val_data=val_loader)
    small = dcopt.export(dm)
"""
from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Optional, Union

import torch

from .budget import BudgetLanding, land_on_budget
from .config import _require_finite
from .modes import eval_mode
from .tolerance import balance_beta

__all__ = ["fit", "History", "EpochRecord"]

PHASES = ("fixed", "optimize", "settle")


@dataclass
class EpochRecord:
    """What one epoch ended with. ``epoch`` counts over the whole run (from 1),
    ``phase_epoch`` within its phase. Losses are means over samples; ``train_loss`` is
    the task loss only (``complexity_loss`` is the mean β-weighted term added to it in
    the optimize phase, 0 otherwise). ``val_loss``/``metric`` are measured in eval
    mode (integer kept sizes, no noise: what the exported model computes), ``None``
    without ``val_data``/``metric_fn``. ``macs_fraction``/``params_fraction`` are at
    the kept sizes; ``sizes`` maps group name → kept width, ``kappa`` → κ = s/N."""
    phase: str
    epoch: int
    phase_epoch: int
    train_loss: float
    complexity_loss: float
    val_loss: Optional[float]
    metric: Optional[float]
    macs_fraction: float
    params_fraction: float
    beta: float
    sizes: dict[str, int]
    kappa: dict[str, float]
    steps: int
    seconds: float
    # per group, optimize phase only (empty otherwise): epoch means of d(task loss)/dκ and
    # d(complexity term)/dκ — the task's pull (usually < 0: a larger κ lowers the loss)
    # against the regularizer's push (> 0); where they cancel a size stops.
    task_grad: dict[str, float] = field(default_factory=dict)
    # per group, optimize phase only: the standard deviation of d(task loss)/dκ over the
    # epoch's steps. Adam moves κ by about size_lr·mean/√(mean² + std²) a step, so a pull
    # much noisier than its mean moves a size slowly even where the means balance.
    task_grad_std: dict[str, float] = field(default_factory=dict)
    complexity_grad: dict[str, float] = field(default_factory=dict)
    # tolerance mode: the loss estimate the β controller saw this epoch (val loss, or the
    # training-loss EMA) and the bound (1 + tolerance)·reference it was held to.
    constraint_loss: Optional[float] = None
    loss_bound: Optional[float] = None
    # tolerance mode: after this epoch the sizes went back to the last epoch that met the
    # bound (the bound stayed violated: a size pushed past what the task needs does not
    # come back by gradient, the consumers stop using its noisy boundary feature).
    backtracked: bool = False
    # budget mode, second half of the optimize phase: the kept MACs were above the budget
    # after this epoch and the sizes were cut to these (dcopt.budget.land_on_budget, never
    # growing); the sizes train on from there
    budget_cut: Optional[dict[str, int]] = None


@dataclass
class KappaPoint:
    """One optimizer step of the optional per-step trace (``fit(..., trace_kappa=True)``)."""
    step: int
    phase: str
    kappa: dict[str, float]
    beta: float


@dataclass
class History:
    """Per-epoch records of a :func:`fit` run (and, optionally, a per-step κ trace)."""
    epochs: list[EpochRecord] = field(default_factory=list)
    kappa_trace: list[KappaPoint] = field(default_factory=list)
    widths: dict[str, int] = field(default_factory=dict)
    tolerance: Optional[float] = None        # tolerance mode: the relative loss allowance
    reference_loss: Optional[float] = None   # tolerance mode: the fixed phase's loss
    # budget mode: the integer sizes chosen at the end of the optimize phase
    # (:func:`dcopt.budget.land_on_budget`); the settle records show them, the last
    # optimize record the sizes before
    budget_landing: Optional[BudgetLanding] = None
    # the kept integer sizes when fit returned: what export keeps (``last.sizes`` are the
    # sizes that epoch ran with, before a budget landing that no settle epoch followed)
    final_sizes: dict[str, int] = field(default_factory=dict)
    # ``fit(..., reorder=...)``: {"perms": group -> old index at each new position,
    # "skipped": group -> why it kept its order, "max_error": the check's} (``Reordered``)
    reordered: Optional[dict] = None

    def __len__(self) -> int:
        return len(self.epochs)

    def phase(self, name: str) -> list[EpochRecord]:
        """The records of one phase ("fixed", "optimize" or "settle")."""
        if name not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {name!r}")
        return [r for r in self.epochs if r.phase == name]

    @property
    def last(self) -> Optional[EpochRecord]:
        return self.epochs[-1] if self.epochs else None

    def column(self, name: str) -> list:
        """One field over all epochs, e.g. ``hist.column("macs_fraction")``."""
        return [getattr(r, name) for r in self.epochs]

    def to_dict(self) -> dict[str, Any]:
        """Plain Python (JSON-serialisable) form."""
        return {"widths": dict(self.widths), "final_sizes": dict(self.final_sizes), "tolerance": self.tolerance,
                "reference_loss": self.reference_loss,
                "budget_landing": asdict(self.budget_landing) if self.budget_landing is not None else None,
                "epochs": [asdict(r) for r in self.epochs],
                "kappa_trace": [asdict(p) for p in self.kappa_trace], "reordered": self.reordered}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "History":
        """The inverse of :meth:`to_dict` (how a resumed :func:`fit` gets its history back)."""
        landing = d.get("budget_landing")
        return cls(epochs=[EpochRecord(**r) for r in d.get("epochs", [])],
                   kappa_trace=[KappaPoint(**p) for p in d.get("kappa_trace", [])],
                   widths=dict(d.get("widths", {})), tolerance=d.get("tolerance"),
                   reference_loss=d.get("reference_loss"),
                   budget_landing=BudgetLanding(**landing) if landing is not None else None,
                   final_sizes=dict(d.get("final_sizes", {})), reordered=d.get("reordered"))


# -- helpers ------------------------------------------------------------------------------

def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _as_args(inputs) -> tuple:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def _batch_size(target, args) -> int:
    for t in (target, *args):
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return int(t.shape[0])
    return 1


_BATCH_FORM = "each batch must be a pair (inputs, target); inputs a tensor or a tuple of tensors"


def _is_inputs(inputs) -> bool:
    return isinstance(inputs, torch.Tensor) or (isinstance(inputs, (tuple, list))
                                                and all(_is_inputs(x) for x in inputs))


def _kind(obj) -> str:
    if isinstance(obj, (tuple, list)):
        return f"a {type(obj).__name__} of ({', '.join(type(x).__name__ for x in obj)})"
    return f"a {type(obj).__name__}"


def _split(batch):
    """``(inputs, target)`` of one batch, or a TypeError that says what the batch was.
    Unpacking alone is not a check: a two-key dict unpacks into its key strings and a
    tensor of 2 rows into its rows, and the model then fails deep inside (or, for the
    rows, trains on the wrong thing)."""
    if isinstance(batch, Mapping):
        raise TypeError(f"{_BATCH_FORM}, got a {type(batch).__name__} with keys {list(batch)} (unpacking it "
                        "gives the keys): make each batch a pair, e.g. (b['x'], b['y'])")
    if isinstance(batch, torch.Tensor):
        raise TypeError(f"{_BATCH_FORM}, got a single tensor of shape {tuple(batch.shape)}")
    try:
        inputs, target = batch
    except (TypeError, ValueError):
        raise TypeError(f"{_BATCH_FORM}, got {_kind(batch)}") from None
    if not _is_inputs(inputs):
        raise TypeError(f"{_BATCH_FORM}, got inputs {_kind(inputs)}")
    return inputs, target


def _epoch_count(name: str, n) -> int:
    """An epoch count as an int (``2.0`` is 2 epochs; ``range`` takes ints only)."""
    try:
        ok = int(n) == n and n >= 0
    except (TypeError, ValueError, OverflowError):  # not a number, NaN, inf
        ok = False
    if not ok:
        raise ValueError(f"{name} must be a non-negative integer, got {n!r}")
    return int(n)


def _require_reiterable(name: str, data) -> None:
    """fit reads ``train_data`` every epoch and ``val_data`` after every epoch: a generator
    (any one-shot iterator) is spent after the first pass, and the epochs after it would
    see no batches. Checked by type, without calling ``iter`` (a DataLoader would start
    its workers)."""
    if isinstance(data, Iterator):
        raise ValueError(f"{name} must be re-iterable every epoch, e.g. a DataLoader or a list, not a generator "
                         f"or other one-shot iterator (got {type(data).__name__})")


def _batches(data: Iterable, device):
    """``(args, target)`` per batch of ``data``, on ``device``: how training and evaluation
    read a batch, in one place."""
    for batch in data:
        inputs, target = _split(batch)
        yield _as_args(_to(inputs, device)), _to(target, device)


def _make_optimizer(optimizer, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    if callable(optimizer) and not isinstance(optimizer, str):
        return optimizer(groups)
    name = str(optimizer).lower()
    table = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
    if name not in table:
        raise ValueError(f"optimizer must be one of {sorted(table)} or a callable taking parameter groups, "
                         f"got {optimizer!r}")
    kwargs = {"momentum": 0.9} if name == "sgd" else {}
    return table[name](groups, lr=lr, **kwargs)


def _short(name: str, limit: int = 14) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1):]


def _sizes_text(sizes: dict[str, int], widths: dict[str, int], limit: int = 4) -> str:
    items = [f"{_short(n)}: {k}/{widths.get(n, k)}" for n, k in sizes.items()]
    more = len(items) - limit
    return ", ".join(items[:limit]) + (f", +{more} more" if more > 0 else "")


def _fmt(x: Optional[float], spec: str = ".4g") -> str:
    return "–" if x is None else format(x, spec)


class _NoProgress:
    """Stand-in for rich.progress.Progress when ``progress=False``."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *a, **k):
        return 0

    def update(self, *a, **k):
        pass

    def advance(self, *a, **k):
        pass

    class console:  # noqa: N801 - mimic the attribute
        @staticmethod
        def print(*a, **k):
            pass


def _progress(enabled: bool, show_metric: bool):
    if not enabled:
        return _NoProgress()
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    metric = " · metric {task.fields[metric]}" if show_metric else ""
    return Progress(
        TextColumn("[bold]{task.fields[phase]:>8}[/] ep {task.fields[ep]}"),
        BarColumn(bar_width=16),
        TextColumn("loss {task.fields[loss]}" + metric + " · MACs {task.fields[macs]} · "
                   "[cyan]{task.fields[sizes]}[/]"),
        TimeElapsedColumn(),
    )


# -- the loop -----------------------------------------------------------------------------

def fit(dm, train_data: Iterable, loss_fn: Callable, *, fixed_epochs: int, optimize_epochs: int,
        settle_epochs: Optional[int] = None, lr: float = 1e-3, size_lr: Optional[float] = None,
        optimizer: Union[str, Callable] = "adam", weight_decay: float = 0.0,
        val_data: Optional[Iterable] = None, metric_fn: Optional[Callable] = None,
        grad_clip: Optional[float] = None, device: Union[str, torch.device, None] = None,
        trace_kappa: bool = False, progress: bool = True, log_every: int = 1,
        tolerance: Union[float, "ToleranceController", None] = None, cross_epochs: float = 8.0,
        settle_lr: Optional[float] = None, checkpoint: Union[str, "os.PathLike", None] = None,
        reorder: Union[bool, Iterable[str]] = False) -> History:
    """Train ``dm`` (a :class:`~dcopt.DynamicModel`) through the fixed → optimize → settle
    schedule and return the :class:`History`.

    * ``train_data`` / ``val_data``: any re-iterable of ``(inputs, target)`` batches (a
      DataLoader, a list); ``inputs`` a tensor or a tuple of tensors (passed as
      positional arguments). Batches are moved to ``device`` (default: the model's).
      A generator (one pass only), data that yields no batches, or a batch of another
      form (a dict, a single tensor) is an error, not a missing value.
    * ``loss_fn(output, target)`` → scalar task loss (a one-element tensor).
      ``metric_fn(output, target)`` → a number, averaged over ``val_data`` (weighted by batch size); lower or higher
      is yours to interpret.
    * ``fixed_epochs``: weights only, full width, no noise. ``optimize_epochs``: sizes
      and weights, loss = task + ``dm.complexity_loss()`` (in budget mode that call also
      adapts β, once per step). ``settle_epochs``: sizes frozen at the learned values,
      weights fine-tune without noise. A phase with 0 epochs is skipped.
    * Budget mode (``convert(..., target_macs=t)``) ends the optimize phase with
      :func:`dcopt.budget.land_on_budget`: the integer sizes become the largest whose
      kept MACs are at most t, in the proportions training learned (rounding ⌈s⌉ alone
      lands a few % above or below t). It only shrinks when no settle phase follows in the
      same call, so every kept feature has trained at its final size. What it did:
      ``History.budget_landing``; it warns when even the κ_min floors exceed t. In the
      second half of the optimize phase, sizes whose kept MACs are still above t after an
      epoch are already cut to t (shrinking only; ``EpochRecord.budget_cut``), so a dual
      ascent that lags is corrected while the weights still train at ``lr``.
    * ``lr``: weights; ``settle_lr`` (default ``lr``): weights in the settle phase, where
      fine-tuning at the final sizes pays for a lower rate. ``size_lr``: the κ of every
      group, deliberately slower than the weights (DESIGN.md, "Size dynamics": sizes as
      fast as the weights are bistable in β; slower ones let the weights re-adapt and
      give a gradual size-vs-β curve).
    * ``optimizer``: "adam" (default), "adamw", "sgd" (momentum 0.9) or a callable
      ``groups -> torch.optim.Optimizer``. One optimizer lives through all phases (the
      weights keep their moments); size parameters only move in the optimize phase and
      never get weight decay.
    * ``progress``: a rich progress bar with phase, epoch, loss, metric, kept MACs % and
      the sizes, and below it a summary line every ``log_every`` epochs (0: none).
      ``progress=False`` is silent: no bar, no lines (the History has every epoch).
    * ``trace_kappa``: also record κ and β after every optimizer step.
    * ``tolerance`` (tolerance mode, :mod:`dcopt.tolerance`): e.g. 0.02 — find the
      smallest model whose task loss stays within 2 % of the reference, the fixed phase's
      converged loss (mean ``val_data`` loss of its last 3 epochs if given — recommended —
      else an EMA of the training loss). β is then a Lagrange multiplier that fit adapts
      once per optimize epoch (the config's ``beta`` is ignored), and the sizes go back
      to the last epoch that met the bound when they overshoot. Pass a
      :class:`~dcopt.tolerance.ToleranceController` instead of a float to set its rates.
      Cannot be combined with ``target_macs`` (budget mode). Defaults change with it:
      ``size_lr`` = (1 − κ_min)/(``cross_epochs``·steps per epoch), so a size needs at
      least ``cross_epochs`` epochs to cross its whole range (Adam moves a parameter by at
      most about lr a step), and ``settle_epochs`` = optimize_epochs // 4. Outside
      tolerance mode ``size_lr`` defaults to 3e-4 and ``settle_epochs`` to 0.
    * ``checkpoint``: a file path. After every epoch fit writes there everything the next
      epoch needs (model, optimizer, history, tolerance controller, random generators;
      :mod:`dcopt.checkpoint`); called again with the same path and schedule, it continues
      after the last epoch written (a finished run returns its history at once). With
      the same data in the same order the resumed run equals the uninterrupted one; the
      learning rates in force are the checkpoint's. A checkpoint of another model or
      schedule is refused (``ValueError``); delete it to start afresh. Its folder is
      created if missing.

    * ``reorder``: at the start of the optimize phase, put each group's features in
      order of magnitude, largest first (:func:`dcopt.reorder.reorder_by_importance`; the
      same function, checked by numbers; the optimizer's moments follow), so the first
      features the shrinking sizes cut are the least important, not the last by index.
      ``True``: every group; a list of group names: those only (leave out groups whose
      order means something, e.g. a filter bank in :func:`dcopt.spread_order`). What it
      did: ``History.reordered``.

    Every optimize epoch also records, per group, the mean of d(task)/dκ and of
    d(complexity term)/dκ (``EpochRecord.task_grad``/``complexity_grad``): why a size stops.

    At the end the model is left with its sizes fixed (``dm.fix_sizes()``, noise off),
    in train mode; the learned sizes are what :func:`dcopt.export` keeps.
    """
    fixed_epochs = _epoch_count("fixed_epochs", fixed_epochs)
    optimize_epochs = _epoch_count("optimize_epochs", optimize_epochs)
    if settle_epochs is not None:
        settle_epochs = _epoch_count("settle_epochs", settle_epochs)
    _require_reiterable("train_data", train_data)
    _require_reiterable("val_data", val_data)
    for name, value in (("lr", lr), ("size_lr", size_lr), ("settle_lr", settle_lr), ("cross_epochs", cross_epochs)):
        if value is not None:
            _require_finite(name, value)
    dm = _resolve(dm, train_data, device)
    if reorder is not False and reorder is not True:   # a name missing would only show after the fixed phase
        reorder = [reorder] if isinstance(reorder, str) else list(reorder)
        unknown = sorted(set(reorder) - set(dm.group_names))
        if unknown:
            raise KeyError(f"reorder names no dynamic group {unknown}; groups: {dm.group_names}")
    try:
        steps_per_epoch = len(train_data)  # type: ignore[arg-type]
    except TypeError:
        steps_per_epoch = None
    controller = _tolerance_controller(dm, tolerance)
    if settle_epochs is None:
        settle_epochs = optimize_epochs // 4 if controller is not None else 0
    if size_lr is None:
        size_lr = _auto_size_lr(dm, steps_per_epoch, cross_epochs) if controller is not None else 3e-4
    if lr <= 0 or size_lr < 0:
        raise ValueError(f"lr must be > 0 and size_lr >= 0, got lr={lr}, size_lr={size_lr}")
    if settle_lr is not None and settle_lr <= 0:
        raise ValueError(f"settle_lr must be > 0, got {settle_lr}")

    if device is None:
        first = next(dm.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)

    size_params = list(dm.size_parameters())
    size_ids = {id(p) for p in size_params}
    weights = [p for p in dm.weight_parameters() if id(p) not in size_ids and p.requires_grad]
    groups = [{"params": weights, "lr": lr, "weight_decay": weight_decay, "name": "weights"}]
    if size_params:
        groups.append({"params": size_params, "lr": size_lr, "weight_decay": 0.0, "name": "sizes"})
    opt = _make_optimizer(optimizer, groups, lr)

    widths = {name: info.width for name, info in dm.sizes().items()}
    history = History(widths=widths, tolerance=controller.tolerance if controller is not None else None)
    plan = [(p, n) for p, n in zip(PHASES, (fixed_epochs, optimize_epochs, settle_epochs)) if n > 0]
    if dm.config.target_macs is not None and not optimize_epochs:
        warnings.warn(f"budget mode (target_macs={dm.config.target_macs:g}) with optimize_epochs=0: the sizes "
                      "do not move and no landing on the budget happens; the model keeps its current widths",
                      stacklevel=2)
    total_epochs = sum(n for _, n in plan)
    # the training-loss EMA: tolerance mode's loss estimate without val_data
    ema = _tolerance_ema(steps_per_epoch) if controller is not None and val_data is None else None

    step = 0
    epoch = 0
    schedule = (fixed_epochs, optimize_epochs, settle_epochs)
    resumed = _resume(checkpoint, dm, opt, controller, ema, schedule)
    saved_last_ok = None
    if resumed is not None:
        history, epoch, step, saved_last_ok = resumed
    done = epoch  # epochs a checkpoint already holds
    with _progress(progress, metric_fn is not None and val_data is not None) as bar:
        task_id = bar.add_task("fit", total=(steps_per_epoch * total_epochs) if steps_per_epoch else None,
                               phase="", ep="", loss="–", metric="–", macs="–", sizes="")
        if done:
            if steps_per_epoch:
                bar.update(task_id, advance=steps_per_epoch * done, ep=f"{done}/{total_epochs}")
            if progress:
                bar.console.print(f"resumed from {checkpoint} after epoch {done} of {total_epochs}")
        first = 0  # the run-wide number of the epoch before this phase's first
        for phase, n_epochs in plan:
            first, start = first + n_epochs, first
            if done >= first:
                continue  # the checkpoint holds this whole phase
            mid_phase = done > start  # resuming inside this phase: its start already happened
            if phase == "optimize" and controller is not None and not mid_phase:
                history.reference_loss = _start_tolerance(controller, dm, history, ema, train_data, val_data,
                                                          loss_fn, device)
            if phase == "optimize" and reorder is not False and not mid_phase:
                from .reorder import reorder_by_importance
                history.reordered = asdict(reorder_by_importance(
                    dm, groups=None if reorder is True else ([reorder] if isinstance(reorder, str) else reorder),
                    optimizer=opt))
            if ema is not None and phase == "optimize" and not mid_phase:
                ema = _tolerance_ema(steps_per_epoch)  # the noisy optimize losses start a new average
            if phase == "settle" and settle_lr is not None:
                for group in opt.param_groups:
                    if group.get("name") == "weights":
                        group["lr"] = settle_lr
            (dm.optimize_sizes if phase == "optimize" else dm.fix_sizes)()
            opt.zero_grad(set_to_none=True)
            last_ok = [k.detach().clone() for k in size_params]  # the sizes the reference was measured at
            if mid_phase and saved_last_ok is not None:  # read to the CPU; the sizes may live elsewhere
                last_ok = [o.to(k.device, k.dtype) for k, o in zip(size_params, saved_last_ok)]
            for phase_epoch in range(1 + (done - start if mid_phase else 0), n_epochs + 1):
                epoch += 1
                t0 = time.perf_counter()
                dm.train()
                sum_task = sum_cx = 0.0
                seen = 0
                epoch_steps = 0
                grad_task = torch.zeros(len(size_params))
                grad_task_sq = torch.zeros(len(size_params), dtype=torch.float64)
                grad_cx = torch.zeros(len(size_params))
                for args, target in _batches(train_data, device):
                    out = dm(*args)
                    task = loss_fn(out, target)
                    if not (isinstance(task, torch.Tensor) and task.numel() == 1):  # backward needs one number
                        raise TypeError("loss_fn must return the batch's loss as a scalar tensor (reduce it, e.g. "
                                        "reduction='mean'), got " + (f"a tensor of shape {tuple(task.shape)}"
                                                                     if isinstance(task, torch.Tensor) else _kind(task)))
                    if phase == "optimize":
                        cx = dm.complexity_loss()
                        cx = cx.to(task.dtype).to(task.device) if isinstance(cx, torch.Tensor) else cx
                        loss = task + cx
                    else:
                        cx = 0.0
                        loss = task
                    if not torch.isfinite(loss.detach()).all():
                        raise FloatingPointError(
                            f"non-finite loss ({float(loss.detach())}) in the {phase} phase, epoch {phase_epoch}, "
                            f"step {step}; sizes {dm.kept_sizes()}. Lower lr/size_lr or clip gradients "
                            "(grad_clip=...)")
                    opt.zero_grad(set_to_none=True)
                    d_cx = _size_grads(cx, size_params) if phase == "optimize" else None
                    loss.backward()
                    if d_cx is not None:
                        d_all = torch.stack([p.grad.detach().reshape(()).cpu() if p.grad is not None
                                             else torch.zeros(()) for p in size_params])
                        grad_cx += d_cx
                        grad_task += d_all - d_cx
                        grad_task_sq += (d_all - d_cx).double() ** 2
                    if grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(weights, grad_clip)
                    opt.step()
                    step += 1
                    epoch_steps += 1
                    bs = _batch_size(target, args)
                    seen += bs
                    sum_task += float(task.detach()) * bs
                    if ema is not None:
                        ema.add(float(task.detach()))
                    sum_cx += float(cx.detach() if isinstance(cx, torch.Tensor) else cx) * bs
                    if trace_kappa:
                        history.kappa_trace.append(KappaPoint(
                            step=step, phase=phase,
                            kappa={n: float(min(1.0, max(dm.config.kappa_min, float(k.detach()))))
                                   for n, k in zip(dm.group_names, size_params)},
                            beta=float(dm.beta)))
                    if progress:
                        fields = {"loss": _fmt(sum_task / max(seen, 1))}
                        if phase == "optimize" and (epoch_steps % 10 == 1):
                            kept = dm.sizes()
                            fields["macs"] = f"{100 * float(dm.complexity(at='kept').macs_fraction):.1f}%"
                            fields["sizes"] = _sizes_text({n: i.kept for n, i in kept.items()}, widths)
                        bar.update(task_id, advance=1, phase=phase, ep=f"{epoch}/{total_epochs}", **fields)
                if seen == 0:
                    raise ValueError("train_data yielded no batches (it must be re-iterable every epoch, "
                                     "e.g. a DataLoader or a list, not a generator)")
                dm._project()  # the last step's κ back into [κ_min, 1] before reading sizes
                val_loss, metric = _evaluate(dm, val_data, loss_fn, metric_fn, device)
                rec = _record(dm, phase, epoch, phase_epoch, sum_task / seen, sum_cx / seen, val_loss, metric,
                              epoch_steps, time.perf_counter() - t0)
                if phase == "optimize":
                    rec.task_grad = {n: float(g) / epoch_steps for n, g in zip(dm.group_names, grad_task)}
                    rec.task_grad_std = {n: max(0.0, float(q) / epoch_steps - (float(g) / epoch_steps) ** 2) ** 0.5
                                         for n, g, q in zip(dm.group_names, grad_task, grad_task_sq)}
                    rec.complexity_grad = {n: float(g) / epoch_steps for n, g in zip(dm.group_names, grad_cx)}
                    if controller is not None:
                        rec.constraint_loss = val_loss if val_data is not None else ema.value
                        rec.loss_bound = controller.bound
                        if not controller.calibrated:
                            controller.calibrate(balance_beta(rec, float(dm.beta), controller.calibration_noise))
                        with torch.no_grad():
                            at_full = all(rec.sizes[n] >= w for n, w in widths.items())
                            dm.beta.fill_(controller.update(rec.constraint_loss, full_width=at_full))
                        last_ok, rec.backtracked = _guard(controller.steps[-1], size_params, last_ok, opt,
                                                          final=phase_epoch == n_epochs)
                        for group in opt.param_groups:  # recovering after a backtrack: sizes wait
                            if group.get("name") == "sizes":
                                group["lr"] = 0.0 if controller.steps[-1].recovering else size_lr
                history.epochs.append(rec)
                if phase == "optimize" and dm.config.target_macs is not None:
                    if phase_epoch == n_epochs:
                        history.budget_landing = _land(dm, grow=settle_epochs > 0, bar=bar if progress else None)
                    elif 2 * phase_epoch >= n_epochs:
                        # second half: sizes still above the budget are cut to it now, while
                        # the weights train on at the full lr (a cut left to the last epoch is
                        # followed only by the low-lr settle phase); within it, nothing moves
                        cut = land_on_budget(dm, grow=False)
                        rec.budget_cut = cut.after if cut.changed else None
                if progress:
                    bar.update(task_id, phase=phase, ep=f"{epoch}/{total_epochs}",
                               loss=_fmt(rec.val_loss if rec.val_loss is not None else rec.train_loss),
                               metric=_fmt(rec.metric), macs=f"{100 * rec.macs_fraction:.1f}%",
                               sizes=_sizes_text(rec.sizes, widths))
                    if log_every and (epoch % log_every == 0 or epoch == total_epochs):
                        bar.console.print(_summary_line(rec, widths))
                if checkpoint is not None:
                    from .checkpoint import save_fit_state

                    save_fit_state(checkpoint, dm=dm, opt=opt, history=history, schedule=schedule, epoch=epoch,
                                   step=step, controller=controller, ema=ema,
                                   last_ok=last_ok if phase == "optimize" else None)
        dm.fix_sizes()
        dm.train()
    history.final_sizes = {name: info.kept for name, info in dm.sizes().items()}
    return history


def _resume(checkpoint, dm, opt, controller, ema, schedule):
    """Load ``checkpoint`` into the model, optimizer, controller and loss average when the
    file exists (:mod:`dcopt.checkpoint`); returns (history, epochs done, steps done, the
    tolerance fallback sizes) or None for a fresh start."""
    if checkpoint is None:
        return None
    # a path that cannot hold the file fails here, not after the first epoch's training
    if not str(checkpoint).strip() or os.path.isdir(checkpoint):
        raise ValueError(f"checkpoint must be a file path, not {str(checkpoint)!r}"
                         + (" (a directory)" if str(checkpoint).strip() else ""))
    if not os.path.exists(checkpoint):
        os.makedirs(os.path.dirname(os.path.abspath(checkpoint)), exist_ok=True)
        return None
    from .checkpoint import load_fit_state, restore_fit_state

    state = load_fit_state(checkpoint, dm=dm, schedule=schedule)
    restore_fit_state(state, dm=dm, opt=opt, controller=controller, ema=ema, path=checkpoint)
    return History.from_dict(state["history"]), state["epoch"], state["step"], state["last_ok"]


def _land(dm, grow: bool, bar) -> BudgetLanding:
    """Budget mode's end of the optimize phase: integer sizes within the budget."""
    landing = land_on_budget(dm, grow=grow)
    if not landing.met and not landing.before:
        warnings.warn(f"budget mode: the model has no dynamic group (every width stays fixed; dcopt.analyze says "
                      f"why), so nothing can be sized to target_macs={landing.target:g}: it keeps "
                      f"{landing.macs_after:.1%} of the MACs", RuntimeWarning, stacklevel=3)
    elif not landing.met:
        warnings.warn(f"budget mode: even every group at its kappa_min floor keeps {landing.macs_after:.1%} of the "
                      f"MACs, above target_macs={landing.target:g}; lower kappa_min or raise the budget",
                      RuntimeWarning, stacklevel=3)
    if bar is not None and landing.changed:
        bar.console.print(f"budget: kept MACs {landing.macs_before:.1%} -> {landing.macs_after:.1%} "
                          f"(target {landing.target:.1%}), sizes {landing.after}")
    return landing


def _tolerance_controller(dm, tolerance):
    """The ToleranceController of tolerance mode (None in β and budget mode)."""
    from .tolerance import ToleranceController

    if tolerance is None:
        return None
    if dm.config.target_macs is not None:
        raise ValueError("tolerance mode (fit(..., tolerance=...)) and budget mode (target_macs) each adapt β "
                         "to a different target; choose one: convert without target_macs, or fit without "
                         "tolerance")
    if isinstance(tolerance, ToleranceController):
        return tolerance
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)):
        raise TypeError(f"tolerance must be a number (e.g. 0.02) or a ToleranceController, got {tolerance!r}")
    return ToleranceController(float(tolerance))


def _auto_size_lr(dm, steps_per_epoch: Optional[int], cross_epochs: float) -> float:
    """Tolerance mode's size learning rate: Adam moves a parameter by about lr per step at
    most, so a κ needs at least ``cross_epochs`` epochs to cross [κ_min, 1]."""
    if cross_epochs <= 0:
        raise ValueError(f"cross_epochs must be > 0, got {cross_epochs}")
    if not steps_per_epoch:
        return 3e-4
    return (1.0 - dm.config.kappa_min) / (cross_epochs * steps_per_epoch)


def _tolerance_ema(steps_per_epoch: Optional[int]):
    from .tolerance import LossAverage

    return LossAverage(halflife=max(1.0, (steps_per_epoch or 100) / 4))


def _start_tolerance(controller, dm, history, ema, train_data, val_data, loss_fn, device) -> float:
    """Set the reference loss (unless the controller has one) and β at the start of the
    optimize phase. The reference is the fixed phase's converged loss: the mean val loss of
    its last (up to) 3 epochs, or the training-loss EMA at its end; without a fixed epoch
    in this call, one evaluation pass (eval mode) on val_data, else on train_data."""
    if controller.reference is None:
        fixed = history.phase("fixed")
        if val_data is not None:
            losses = [r.val_loss for r in fixed]
            ref = sum(losses[-3:]) / len(losses[-3:]) if fixed else _evaluate(dm, val_data, loss_fn, None, device)[0]
        else:
            losses = [r.train_loss for r in fixed]
            ref = ema.value if (fixed and ema.value is not None) else \
                _evaluate(dm, train_data, loss_fn, None, device, name="train_data")[0]
        _warn_unconverged(losses, controller.tolerance)
        controller.set_reference(ref)
    elif controller.beta is None:
        controller.set_reference(controller.reference)
    with torch.no_grad():
        dm.beta.fill_(controller.beta)
    return controller.reference


@torch.no_grad()
def _guard(step, size_params, last_ok, opt, final: bool):
    """Tolerance mode's fallback: remember the sizes of the last epoch that met the bound;
    when the bound stays violated by a wide margin (``step.backtrack``), or the optimize
    phase ends on an epoch beyond the hold band (``not step.in_band``), put them back (and restart Adam's moments for the
    sizes, which still point down). Returns (sizes to fall back to, whether it did)."""
    if step.feasible:
        return [k.detach().clone() for k in size_params], False
    if not (step.backtrack or (final and not step.in_band)) or all(torch.equal(k, o) for k, o in zip(size_params, last_ok)):
        return last_ok, False
    for k, old in zip(size_params, last_ok):
        k.copy_(old)
        opt.state.pop(k, None)
    return last_ok, True


def _warn_unconverged(losses: list, tolerance: float) -> None:
    """The bound is only as good as the reference: say so when the fixed phase's loss was
    still moving by more than the tolerance over its last epochs, or jumping between epochs
    by more than the tolerance (then the controller cannot tell a size that costs loss from
    learning-rate jitter: measured on the VAD CRNN at lr 2e-3, val loss ±20 % between epochs)."""
    from .tolerance import loss_drift, loss_jitter

    change = loss_drift(losses)
    if change is not None and abs(change) > tolerance:
        warnings.warn(f"tolerance mode: the fixed phase's loss still moved by {100 * change:+.1f} % over its "
                      f"last 3 epochs, more than the tolerance ({100 * tolerance:g} %); the reference loss, and "
                      "so the bound, may be off. Train the fixed phase longer (fixed_epochs).", RuntimeWarning,
                      stacklevel=4)
    jitter = loss_jitter(losses)
    if jitter is not None and jitter > tolerance:
        warnings.warn(f"tolerance mode: the fixed phase's last epoch losses jump by up to {100 * jitter:.1f} % "
                      f"of their mean, more than the tolerance ({100 * tolerance:g} %): the controller cannot "
                      "tell a size that costs loss from epoch-to-epoch jitter. Lower the learning rate (e.g. "
                      "continue from the converged full model at a lower lr, fixed_epochs=0), use a larger "
                      "val_data, or a larger tolerance.", RuntimeWarning, stacklevel=4)


def _size_grads(cx, size_params) -> Optional[torch.Tensor]:
    """d(complexity term)/dκ per group (zeros where κ does not reach it)."""
    if not size_params:
        return None
    if not (isinstance(cx, torch.Tensor) and cx.requires_grad):
        return torch.zeros(len(size_params))
    grads = torch.autograd.grad(cx, size_params, retain_graph=True, allow_unused=True)
    return torch.stack([g.detach().reshape(()).cpu() if g is not None else torch.zeros(()) for g in grads])


def _resolve(dm, train_data, device):
    """The DynamicModel inside a lazily converted one (converting on a first batch if needed)."""
    from .rewrite import LazyDynamicModel, as_dynamic_model

    if isinstance(dm, LazyDynamicModel) and dm.inner is None:
        first = next(iter(train_data), None)
        if first is None:
            raise ValueError("train_data yielded no batches: the lazily converted model needs one to convert on")
        inputs, _ = _split(first)
        args = _as_args(inputs if device is None else _to(inputs, device))
        # converting runs the batch once: in eval mode, so that BatchNorm does not count it
        # as a training step before the first real one (lazy must train as eager does)
        with eval_mode(dm), torch.no_grad():
            dm(*args)
    dm = as_dynamic_model(dm, "fit")
    if device is not None:
        dm.to(device)
    return dm


@torch.no_grad()
def _evaluate(dm, data, loss_fn, metric_fn, device, name: str = "val_data"):
    """Mean loss (and metric) over ``data`` in eval mode; (None, None) without data. Data
    that yields no batches is an error, not a missing value: a None loss in the history
    reads as "no val_data" and breaks tolerance mode's reference."""
    if data is None:
        return None, None
    was_training = dm.training
    dm.eval()
    total_loss = total_metric = 0.0
    seen = 0
    try:
        for args, target in _batches(data, device):
            out = dm(*args)
            bs = _batch_size(target, args)
            total_loss += float(loss_fn(out, target)) * bs
            if metric_fn is not None:
                total_metric += float(metric_fn(out, target)) * bs
            seen += bs
    finally:
        dm.train(was_training)
    if seen == 0:
        raise ValueError(f"{name} yielded no batches")
    return total_loss / seen, (total_metric / seen if metric_fn is not None else None)


def _record(dm, phase, epoch, phase_epoch, train_loss, cx_loss, val_loss, metric, steps, seconds) -> EpochRecord:
    kept = dm.complexity(at="kept")
    sizes = dm.sizes()
    return EpochRecord(
        phase=phase, epoch=epoch, phase_epoch=phase_epoch, train_loss=train_loss, complexity_loss=cx_loss,
        val_loss=val_loss, metric=metric, macs_fraction=float(kept.macs_fraction),
        params_fraction=float(kept.params_fraction), beta=float(dm.beta),
        sizes={n: i.kept for n, i in sizes.items()}, kappa={n: i.kappa for n, i in sizes.items()},
        steps=steps, seconds=seconds)


def _summary_line(rec: EpochRecord, widths: dict[str, int]) -> str:
    parts = [f"[bold]{rec.phase:>8}[/] ep {rec.epoch:>3}", f"loss {_fmt(rec.train_loss)}"]
    if rec.val_loss is not None:
        parts.append(f"val {_fmt(rec.val_loss)}")
    if rec.metric is not None:
        parts.append(f"metric {_fmt(rec.metric)}")
    parts.append(f"MACs {100 * rec.macs_fraction:.1f}%")
    if rec.phase == "optimize":
        parts.append(f"β {rec.beta:.3g}")
    if rec.loss_bound is not None:
        parts.append(f"bound {_fmt(rec.loss_bound)}")
    parts.append(f"[cyan]{_sizes_text(rec.sizes, widths)}[/]")
    return " · ".join(parts)
