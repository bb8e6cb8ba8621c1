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

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Optional, Union

import torch

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
        return {"widths": dict(self.widths),
                "epochs": [asdict(r) for r in self.epochs],
                "kappa_trace": [asdict(p) for p in self.kappa_trace]}


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


def _split(batch):
    try:
        inputs, target = batch
    except (TypeError, ValueError):
        raise TypeError("each batch must be a pair (inputs, target); inputs a tensor or a tuple of tensors") from None
    return inputs, target


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
        settle_epochs: int = 0, lr: float = 1e-3, size_lr: float = 3e-4,
        optimizer: Union[str, Callable] = "adam", weight_decay: float = 0.0,
        val_data: Optional[Iterable] = None, metric_fn: Optional[Callable] = None,
        grad_clip: Optional[float] = None, device: Union[str, torch.device, None] = None,
        trace_kappa: bool = False, progress: bool = True, log_every: int = 1) -> History:
    """Train ``dm`` (a :class:`~dcopt.DynamicModel`) through the fixed → optimize → settle
    schedule and return the :class:`History`.

    * ``train_data`` / ``val_data``: any re-iterable of ``(inputs, target)`` batches (a
      DataLoader, a list); ``inputs`` a tensor or a tuple of tensors (passed as
      positional arguments). Batches are moved to ``device`` (default: the model's).
    * ``loss_fn(output, target)`` → scalar task loss. ``metric_fn(output, target)`` →
      a number, averaged over ``val_data`` (weighted by batch size); lower or higher
      is yours to interpret.
    * ``fixed_epochs``: weights only, full width, no noise. ``optimize_epochs``: sizes
      and weights, loss = task + ``dm.complexity_loss()`` (in budget mode that call also
      adapts β, once per step). ``settle_epochs``: sizes frozen at the learned values,
      weights fine-tune without noise. A phase with 0 epochs is skipped.
    * ``lr``: weights. ``size_lr``: the κ of every group, deliberately slower than the
      weights (DESIGN.md, "Size dynamics": sizes as fast as the weights are bistable in
      β; slower ones let the weights re-adapt and give a gradual size-vs-β curve).
    * ``optimizer``: "adam" (default), "adamw", "sgd" (momentum 0.9) or a callable
      ``groups -> torch.optim.Optimizer``. One optimizer lives through all phases (the
      weights keep their moments); size parameters only move in the optimize phase and
      never get weight decay.
    * ``progress``: a rich progress bar with phase, epoch, loss, metric, kept MACs % and
      the sizes; ``log_every`` prints a summary line every that many epochs (0: none).
    * ``trace_kappa``: also record κ and β after every optimizer step.

    At the end the model is left with its sizes fixed (``dm.fix_sizes()``, noise off),
    in train mode; the learned sizes are what :func:`dcopt.export` keeps.
    """
    for name, n in (("fixed_epochs", fixed_epochs), ("optimize_epochs", optimize_epochs),
                    ("settle_epochs", settle_epochs)):
        if int(n) != n or n < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {n!r}")
    if lr <= 0 or size_lr < 0:
        raise ValueError(f"lr must be > 0 and size_lr >= 0, got lr={lr}, size_lr={size_lr}")

    dm = _resolve(dm, train_data, device)
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
    history = History(widths=widths)
    plan = [(p, n) for p, n in zip(PHASES, (fixed_epochs, optimize_epochs, settle_epochs)) if n > 0]
    try:
        steps_per_epoch = len(train_data)  # type: ignore[arg-type]
    except TypeError:
        steps_per_epoch = None
    total_epochs = sum(n for _, n in plan)

    step = 0
    epoch = 0
    with _progress(progress, metric_fn is not None and val_data is not None) as bar:
        task_id = bar.add_task("fit", total=(steps_per_epoch * total_epochs) if steps_per_epoch else None,
                               phase="", ep="", loss="–", metric="–", macs="–", sizes="")
        for phase, n_epochs in plan:
            (dm.optimize_sizes if phase == "optimize" else dm.fix_sizes)()
            opt.zero_grad(set_to_none=True)
            for phase_epoch in range(1, n_epochs + 1):
                epoch += 1
                t0 = time.perf_counter()
                dm.train()
                sum_task = sum_cx = 0.0
                seen = 0
                epoch_steps = 0
                for batch in train_data:
                    inputs, target = _split(batch)
                    args = _as_args(_to(inputs, device))
                    target = _to(target, device)
                    out = dm(*args)
                    task = loss_fn(out, target)
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
                    loss.backward()
                    if grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(weights, grad_clip)
                    opt.step()
                    step += 1
                    epoch_steps += 1
                    bs = _batch_size(target, args)
                    seen += bs
                    sum_task += float(task.detach()) * bs
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
                history.epochs.append(rec)
                if progress:
                    bar.update(task_id, phase=phase, ep=f"{epoch}/{total_epochs}",
                               loss=_fmt(rec.val_loss if rec.val_loss is not None else rec.train_loss),
                               metric=_fmt(rec.metric), macs=f"{100 * rec.macs_fraction:.1f}%",
                               sizes=_sizes_text(rec.sizes, widths))
                    if log_every and (epoch % log_every == 0 or epoch == total_epochs):
                        bar.console.print(_summary_line(rec, widths))
        dm.fix_sizes()
        dm.train()
    return history


def _resolve(dm, train_data, device):
    """The DynamicModel inside a lazily converted one (converting on a first batch if needed)."""
    from .rewrite import DynamicModel, LazyDynamicModel

    if isinstance(dm, LazyDynamicModel):
        if dm.inner is None:
            inputs, _ = _split(next(iter(train_data)))
            args = _as_args(inputs if device is None else _to(inputs, device))
            with torch.no_grad():
                dm(*args)
        dm = dm.inner
    if not isinstance(dm, DynamicModel):
        raise TypeError(f"fit expects a DynamicModel (from dcopt.convert), got {type(dm).__name__}")
    if device is not None:
        dm.to(device)
    return dm


@torch.no_grad()
def _evaluate(dm, data, loss_fn, metric_fn, device):
    if data is None:
        return None, None
    was_training = dm.training
    dm.eval()
    total_loss = total_metric = 0.0
    seen = 0
    try:
        for batch in data:
            inputs, target = _split(batch)
            args = _as_args(_to(inputs, device))
            target = _to(target, device)
            out = dm(*args)
            bs = _batch_size(target, args)
            total_loss += float(loss_fn(out, target)) * bs
            if metric_fn is not None:
                total_metric += float(metric_fn(out, target)) * bs
            seen += bs
    finally:
        dm.train(was_training)
    if seen == 0:
        return None, None
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
    parts.append(f"[cyan]{_sizes_text(rec.sizes, widths)}[/]")
    return " · ".join(parts)
