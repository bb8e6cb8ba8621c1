"""Shared pieces of the speech benchmarks (GitHub issue 6): VAD (benchmarks/vad.py) and
keyword spotting (benchmarks/kws.py).

* :func:`count_macs` — MACs per call on the example inputs (``dcopt.count_macs``: LSTMs
  by formula, which ``FlopCounterMode`` misses).
* :func:`static_scaled` — the paper's static baseline: every width of the model scaled
  uniformly by one factor, found by bisection so the MACs land on (not above) a target.
* :func:`torch_pruning_baseline` — Torch-Pruning (PyPI ``torch-pruning``, magnitude
  importance), pruned in small uniform steps until the MACs are at or below a target;
  returns the pruned copy and a record of what it could and could not prune. Never raises:
  on failure it returns the unpruned copy with the error in the record.
* :func:`train_plain` — plain Adam training for baselines with the conventions of
  ``dcopt.fit`` (one Adam over all weights, constant ``lr``, ``settle_lr`` for the last
  ``settle_epochs`` epochs, mean task loss per sample, eval each epoch).
* :func:`eer` — equal error rate from scores and 0/1 labels (ROC, linear interpolation
  at the crossing of FPR and FNR).
* :func:`write_results` — ``<name>.json`` (records, platform, config), ``<name>.md`` (a
  table) and ``<name>.png`` (metric vs MACs, one marker per method).
* :func:`mean_interval` — a mean over seeds with its 95 % Student t interval.

Records passed to :func:`write_results` are dicts with at least ``run`` (name),
``method`` (one of :data:`METHODS`), ``macs``, ``params``, ``metric`` (an error rate as
a fraction, e.g. EER 0.05; shown in percent) and ``seconds``; any other keys are kept in
the JSON. The record with ``method == "full"`` is the reference for "MACs % of full" and
"Δ vs full".
"""
from __future__ import annotations

import copy
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from benchmarks.common import json_safe

__all__ = ["METHODS", "count_macs", "static_scaled", "torch_pruning_baseline", "train_plain", "eer",
           "write_results", "machine_info", "scaled_width", "mean_interval", "fmt_mean_interval",
           "sign_beyond_noise", "seeds_to_tell_sign", "SIGN_AT"]

#: two-sided 95 % Student t quantiles for 1–30 degrees of freedom (beyond: the normal's 1.96)
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def mean_interval(values: Sequence[float]) -> tuple[float, Optional[float]]:
    """The mean of ``values`` (one per seed) and the half-width of its 95 % Student t
    interval (None for a single value). Why: a single run's test error moves by about a
    percentage point with the seed, so whether a mean difference over three seeds says
    anything depends on how much the seeds disagree; an interval that excludes 0 does."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_interval needs at least one value")
    mean, sd = _mean_sd(values)
    if n == 1:
        return mean, None
    return mean, _t95(n - 1) * sd / math.sqrt(n)


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0)


def _t95(df: int) -> float:
    return _T95[df - 1] if df <= len(_T95) else 1.96


def sign_beyond_noise(values: Sequence[float]) -> Optional[str]:
    """"lower" / "higher" when the 95 % interval of the mean of ``values`` lies wholly below /
    above 0; None when it contains 0 (or there is a single value)."""
    mean, half = mean_interval(values)
    if half is None or abs(mean) <= half:
        return None
    return "lower" if mean < 0 else "higher"


def seeds_to_tell_sign(values: Sequence[float], most: int = 1000) -> Optional[int]:
    """How many seeds a 95 % t interval would need to exclude 0 *if* the mean and the
    spread stayed as ``values`` show them (None: fewer than two values, or a mean of 0;
    ``most + 1``: more than ``most``). A rough planning figure, not a test: the observed
    mean of a few seeds is itself uncertain. Why: "not resolved with five seeds" reads
    very differently when resolving would take eight seeds than when it would take 200."""
    if len(values) < 2:
        return None
    mean, sd = _mean_sd(values)
    if mean == 0:
        return None
    return next((k for k in range(2, most + 1) if _t95(k - 1) * sd / math.sqrt(k) < abs(mean)), most + 1)


#: the legend for ``fmt_mean_interval(..., plan=True)``
SIGN_AT = ("“sign at ≈ N seeds”: how many seeds such an interval would need to exclude 0 if the mean and "
           "spread stayed as observed (a rough planning figure)")


def fmt_mean_interval(values: Sequence[float], unit: str = " pp", plan: bool = False) -> str:
    """``"+0.25 ± 9.53 pp"`` (``"+0.25 pp"`` for a single value). With ``plan``, an
    interval that contains 0 adds how many seeds would tell the sign at this spread
    (:func:`seeds_to_tell_sign`): ``"+0.25 ± 0.53 pp, sign at ≈ N seeds"``."""
    mean, half = mean_interval(values)
    text = f"{mean:+.2f}" + ("" if half is None else f" ± {half:.2f}") + unit
    if plan and half is not None and abs(mean) <= half:
        k = seeds_to_tell_sign(values)
        if k is not None:
            text += f", sign at ≈ {k} seeds" if k <= 1000 else ", sign at > 1000 seeds"
    return text


# method → (label, matplotlib marker, colour) for the plot
METHODS = {
    "full": ("full model", "*", "black"),
    "dcopt-kappa": ("dcopt κ_min", "o", "tab:blue"),
    "dcopt-budget": ("dcopt budget", "s", "tab:green"),
    "dcopt-tolerance": ("dcopt tolerance", "D", "tab:purple"),
    "static": ("static (uniform widths)", "^", "tab:orange"),
    "static-dcopt-widths": ("static, dcopt's widths", "x", "tab:brown"),
    "torch-pruning": ("Torch-Pruning", "v", "tab:red"),
    # issue 9's VAD study: runs that continue a converged full model
    "conv-full": ("full model, trained on (conv-*)", "P", "grey"),
    "conv-tolerance": ("dcopt tolerance, from the converged model", "D", "tab:pink"),
    "conv-budget": ("dcopt budget, from the converged model", "s", "tab:olive"),
}


def _as_tuple(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def count_macs(model: nn.Module, example_inputs) -> int:
    """MACs of one call of ``model`` on ``example_inputs`` (eval mode, no grad), as
    ``dcopt.count_macs`` counts them (FlopCounterMode ÷ 2, LSTMs by formula; GRUs as
    FlopCounterMode counts them, 3·H·(I+H) per step). The model's train/eval mode is
    restored afterwards."""
    import dcopt

    was = model.training
    model.eval()
    try:
        return int(dcopt.count_macs(model, _as_tuple(example_inputs)))
    finally:
        model.train(was)


def scaled_width(width: int, mult: float) -> int:
    """A width scaled by ``mult``, rounded, at least 1 (the convention of ``static_scaled``)."""
    return max(1, int(round(width * mult)))


def static_scaled(build: Callable[[float], nn.Module], example_inputs, target_macs: int, lo: float = 0.05,
                  hi: float = 1.0, iters: int = 40) -> tuple[nn.Module, float]:
    """The static baseline: ``build(width_mult)`` makes the model with every dynamic width
    scaled by ``width_mult`` (use :func:`scaled_width`). Bisection on ``width_mult`` in
    ``[lo, hi]`` for the largest multiplier whose MACs are ≤ ``target_macs``; if even
    ``lo`` is above the target, ``lo``. Among the candidates seen, the one closest to the
    target from below wins (MACs are a step function of the multiplier). Returns a fresh
    ``build(mult)`` (new random initialisation — seed before calling) and ``mult``."""
    example_inputs = _as_tuple(example_inputs)
    cache: dict[float, int] = {}

    def macs(m: float) -> int:
        if m not in cache:
            with torch.random.fork_rng():
                cache[m] = count_macs(build(m), example_inputs)
        return cache[m]

    if macs(lo) > target_macs:
        best = lo
    elif macs(hi) <= target_macs:
        best = hi
    else:
        a, b = lo, hi  # macs(a) <= target < macs(b)
        for _ in range(iters):
            mid = 0.5 * (a + b)
            if macs(mid) <= target_macs:
                a = mid
            else:
                b = mid
            if b - a < 1e-4:
                break
        feasible = [m for m, v in cache.items() if v <= target_macs]
        best = max(feasible, key=lambda m: (cache[m], m))
    return build(best), best


# -- Torch-Pruning ------------------------------------------------------------------------

def _widths(model: nn.Module) -> dict[str, dict[str, int]]:
    """Per layer the widths Torch-Pruning could change (in/out features, channels, RNN sizes)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            out[name] = {"type": "Linear", "in": m.in_features, "out": m.out_features}
        elif isinstance(m, nn.modules.conv._ConvNd):
            out[name] = {"type": type(m).__name__, "in": m.in_channels, "out": m.out_channels}
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            out[name] = {"type": type(m).__name__, "in": m.num_features, "out": m.num_features}
        elif isinstance(m, nn.RNNBase):
            out[name] = {"type": type(m).__name__, "in": m.input_size, "out": m.hidden_size}
        elif isinstance(m, nn.Embedding):
            out[name] = {"type": "Embedding", "in": m.num_embeddings, "out": m.embedding_dim}
    return out


def _gru_input_pruner():
    """A Torch-Pruning pruner for the *input* width of a single-layer nn.GRU (columns of
    ``weight_ih_l0`` and of its reverse direction). Torch-Pruning 1.6.1 has no GRU
    support: ``ops.module2type`` maps an nn.GRU to an element-wise op, so without this the
    channels of the layer feeding a GRU would be "pruned through" it onto the hidden
    units. The hidden size is not pruned (the GRU is passed as an ignored layer)."""
    import torch_pruning as tp

    class GRUInputPruner(tp.pruner.function.BasePruningFunc):
        TARGET_MODULES = nn.GRU

        def prune_out_channels(self, layer, idxs):
            raise NotImplementedError("GRU hidden units are not pruned by this baseline")

        def prune_in_channels(self, layer, idxs):
            keep = sorted(set(range(layer.input_size)) - set(int(i) for i in idxs))
            for sfx in ([""] + (["_reverse"] if layer.bidirectional else [])):
                name = "weight_ih_l0" + sfx
                setattr(layer, name, self._prune_parameter_and_grad(getattr(layer, name), keep, 1))
            layer.input_size = len(keep)
            layer._flat_weights_names = [n for n in layer._flat_weights_names]
            layer._init_flat_weights()
            return layer

        def get_out_channels(self, layer):
            return layer.hidden_size * (2 if layer.bidirectional else 1)

        def get_in_channels(self, layer):
            return layer.input_size

    return GRUInputPruner()


def _gru_proxy_forward(gru: nn.GRU):
    """A forward with the GRU's in/out widths and a single op (for graph building only)."""
    out = gru.hidden_size * (2 if gru.bidirectional else 1)

    def forward(x, hx=None):
        w = torch.zeros(out, gru.input_size, dtype=x.dtype, device=x.device, requires_grad=True)
        return torch.nn.functional.linear(x, w), None

    return forward


def torch_pruning_baseline(model: nn.Module, example_inputs, target_macs: int, ignored_layers: Sequence = (),
                           steps: int = 100, max_ratio: float = 0.97, **kw) -> tuple[nn.Module, dict]:
    """Prune a deep copy of ``model`` with Torch-Pruning (``MetaPruner``, L2 magnitude
    importance, the same channel ratio in every layer) in ``steps`` equal steps up to
    ``max_ratio`` of the channels, stopping at the first step whose MACs
    (:func:`count_macs`) are ≤ ``target_macs``.

    ``ignored_layers``: modules (of ``model``, mapped to the copy by name) or module names
    that must keep their output width (the output layer). RNNs other than LSTM are ignored
    automatically (Torch-Pruning cannot prune their hidden units); a single-layer GRU gets
    an input-width pruner (:func:`_gru_input_pruner`) and, while the dependency graph is
    built, a one-op stand-in forward (Torch-Pruning 1.6.1 crashes with an IndexError on
    the CPU GRU's autograd graph). ``**kw`` go to ``MetaPruner``.

    Returns ``(pruned model, record)``; record: ``ok``, ``error`` (message or None),
    ``macs_before``/``macs_after``, ``params_before``/``params_after``, ``ratio`` (channel
    fraction removed per layer), ``steps_taken``, ``layers`` (per layer type and
    before/after in/out widths, ``changed``), ``left_alone`` (layer types it kept at full
    width and why), ``reached_target``. Never raises."""
    example_inputs = _as_tuple(example_inputs)
    work = copy.deepcopy(model).eval()
    names = {id(m): n for n, m in model.named_modules()}
    before = _widths(work)
    rec: dict[str, Any] = dict(ok=False, error=None, target_macs=int(target_macs), macs_before=None,
                               macs_after=None, params_before=sum(p.numel() for p in work.parameters()),
                               params_after=None, ratio=0.0, steps_taken=0, layers={}, left_alone={},
                               reached_target=False, package=None, gru_input_pruner=False)
    t0 = time.perf_counter()
    try:
        import torch_pruning as tp

        try:
            from importlib.metadata import version
            rec["package"] = f"torch-pruning {version('torch-pruning')}"
        except Exception:  # noqa: BLE001
            rec["package"] = f"torch-pruning {getattr(tp, '__version__', '?')}"
        rec["macs_before"] = count_macs(work, example_inputs)
        ignored = []
        for item in ignored_layers:
            name = item if isinstance(item, str) else names.get(id(item))
            if name is None:
                raise ValueError(f"ignored layer {item!r} is not a module of the model")
            ignored.append(work.get_submodule(name))
        customized = {}
        for name, m in work.named_modules():
            if isinstance(m, nn.RNNBase) and not isinstance(m, nn.LSTM):
                ignored.append(m)
                rec["left_alone"][name] = (f"{type(m).__name__}: torch-pruning has no pruner for its hidden units "
                                           "(ops.module2type treats it as an element-wise op)")
                if isinstance(m, nn.GRU) and m.num_layers == 1:
                    customized[nn.GRU] = _gru_input_pruner()
                    rec["gru_input_pruner"] = True
        # Torch-Pruning builds its dependency graph from the autograd graph of one forward.
        # On CPU a GRU is a chain of per-step ops (chunked gates read as a torch.split with
        # offsets), which its index mapping crashes on (IndexError). While the graph is
        # built, each GRU runs a stand-in with one op from input to output (a matmul by a
        # constant, not a parameter); the custom GRU pruner then maps in → out by width.
        proxied = [m for m in work.modules() if isinstance(m, nn.GRU) and nn.GRU in customized]
        for m in proxied:
            m.forward = _gru_proxy_forward(m)
        try:
            pruner = tp.pruner.MetaPruner(
                work, example_inputs, importance=tp.importance.MagnitudeImportance(p=2),
                pruning_ratio=max_ratio, iterative_steps=steps, ignored_layers=ignored,
                customized_pruners=customized or None, **kw)
        finally:
            for m in proxied:
                del m.forward
        macs = rec["macs_before"]
        for i in range(steps):
            if macs <= target_macs:
                break
            pruner.step()
            rec["steps_taken"] = i + 1
            macs = count_macs(work, example_inputs)
        rec["ratio"] = max_ratio * rec["steps_taken"] / steps
        rec["macs_after"] = macs
        rec["reached_target"] = macs <= target_macs
        with torch.no_grad():
            work(*example_inputs)  # the pruned model must still run
        rec["ok"] = True
    except Exception as e:  # noqa: BLE001 - a baseline must never crash the benchmark
        rec["error"] = f"{type(e).__name__}: {e}"
        work = copy.deepcopy(model)
        try:
            rec["macs_after"] = count_macs(work, example_inputs)
        except Exception:  # noqa: BLE001
            pass
    after = _widths(work)
    for name, b in before.items():
        a = after.get(name, b)
        rec["layers"][name] = dict(type=b["type"], in_before=b["in"], in_after=a["in"], out_before=b["out"],
                                   out_after=a["out"], changed=(a["in"], a["out"]) != (b["in"], b["out"]))
    for name, layer in rec["layers"].items():
        if not layer["changed"] and name not in rec["left_alone"] and rec["ok"] and rec["steps_taken"]:
            rec["left_alone"][name] = f"{layer['type']}: unchanged (ignored, or bound to the model's input/output)"
    rec["params_after"] = sum(p.numel() for p in work.parameters())
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    work.train()
    return work, rec


# -- plain training -----------------------------------------------------------------------

# The baselines are evaluated exactly as dcopt.fit evaluates a DynamicModel (eval mode,
# means over samples), so the comparison cannot differ in how the numbers are taken.
from dcopt.train import _as_args as _args, _batch_size as _bs  # noqa: E402
from dcopt.train import _evaluate as _fit_evaluate  # noqa: E402


def _evaluate(model, data, loss_fn, metric_fn):
    return _fit_evaluate(model, data, loss_fn, metric_fn, None)


def train_plain(model: nn.Module, train_batches: Iterable, val_batches: Optional[Iterable], loss_fn: Callable,
                epochs: int, lr: float, metric_fn: Optional[Callable] = None, settle_lr: Optional[float] = None,
                settle_epochs: int = 0, grad_clip: Optional[float] = None, weight_decay: float = 0.0,
                on_epoch: Optional[Callable[[int, nn.Module], None]] = None) -> dict:
    """Train ``model`` in place with the conventions of ``dcopt.fit``: one Adam over all
    parameters at a constant ``lr``; the last ``settle_epochs`` epochs at ``settle_lr``
    (fit's settle phase; default ``lr``); ``grad_clip`` on the weights as fit does. Losses
    are means over samples; ``val_loss``/``metric`` (``metric_fn(output, target)``,
    averaged over val batches weighted by batch size) in eval mode after every epoch.
    ``on_epoch(epoch, model)`` is called after each epoch. Returns
    ``{"epochs": [{epoch, lr, train_loss, val_loss, metric, seconds}], "seconds"}``."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    hist = []
    t_all = time.perf_counter()
    for ep in range(1, int(epochs) + 1):
        if settle_epochs and ep == epochs - settle_epochs + 1 and settle_lr is not None:
            for g in opt.param_groups:
                g["lr"] = settle_lr
        t0 = time.perf_counter()
        model.train()
        total = 0.0
        seen = 0
        for inputs, target in train_batches:
            args = _args(inputs)
            out = model(*args)
            loss = loss_fn(out, target)
            if not torch.isfinite(loss.detach()):
                raise FloatingPointError(f"non-finite loss in epoch {ep}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            bs = _bs(target, args)
            total += float(loss.detach()) * bs
            seen += bs
        val_loss, metric = _evaluate(model, val_batches, loss_fn, metric_fn)
        hist.append(dict(epoch=ep, lr=opt.param_groups[0]["lr"], train_loss=total / max(seen, 1),
                         val_loss=val_loss, metric=metric, seconds=time.perf_counter() - t0))
        if on_epoch is not None:
            on_epoch(ep, model)
    model.train()
    return {"epochs": hist, "seconds": time.perf_counter() - t_all}


# -- metric -------------------------------------------------------------------------------

def eer(scores, labels) -> float:
    """Equal error rate of detection scores (higher = positive) against 0/1 labels.

    The ROC is built over the distinct score thresholds (ties form one step); the EER is
    where the false-positive rate equals the false-negative rate, linearly interpolated
    between the two neighbouring ROC points. NaN when one class is missing."""
    s = np.asarray(torch.as_tensor(scores).detach().double().cpu()).ravel()
    y = np.asarray(torch.as_tensor(labels).detach().cpu()).ravel() > 0.5
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0 or len(s) != len(y):
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]   # last index of each block of tied scores
    tp = np.cumsum(y)[last]
    fp = np.cumsum(~y)[last]
    fpr = np.r_[0.0, fp / n_neg]
    fnr = np.r_[1.0, 1.0 - tp / n_pos]
    d = fpr - fnr
    i = int(np.argmax(d >= 0))                              # exists: d[-1] = 1 >= 0; d[0] = -1 < 0
    d0, d1 = d[i - 1], d[i]
    t = d0 / (d0 - d1) if d1 != d0 else 1.0
    return float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))


# -- results --------------------------------------------------------------------------------

def machine_info() -> dict:
    return dict(platform=platform.platform(), machine=platform.machine(), processor=platform.processor(),
                python=platform.python_version(), torch=torch.__version__, cpu_count=os.cpu_count(),
                torch_threads=torch.get_num_threads())





def _fmt_int(n) -> str:
    if n is None:
        return "–"
    n = float(n)
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def results_table(records: list[dict], metric_name: str) -> str:
    """The markdown table of :func:`write_results` (without title)."""
    full = next((r for r in records if r.get("method") == "full"), None)
    lines = [f"| run | method | MACs | MACs % of full | params | {metric_name} | Δ vs full (pp) | wall time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        macs, metric = r.get("macs"), r.get("metric")
        pct = f"{100 * macs / full['macs']:.1f}%" if full and macs is not None and full.get("macs") else "–"
        m = f"{100 * metric:.2f}%" if metric is not None and math.isfinite(metric) else "–"
        if full and metric is not None and full.get("metric") is not None and r is not full:
            delta = f"{100 * (metric - full['metric']):+.2f}"
        else:
            delta = "–"
        secs = r.get("seconds")
        lines.append(f"| {r.get('run', '?')} | {METHODS.get(r.get('method'), (r.get('method'),))[0]} | "
                     f"{_fmt_int(macs)} | {pct} | {_fmt_int(r.get('params'))} | {m} | {delta} | "
                     f"{'–' if secs is None else f'{secs:.0f}'} |")
    return "\n".join(lines)


def plot_results(records: list[dict], path: Path, title: str, metric_name: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = next((r for r in records if r.get("method") == "full"), None)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for method, (label, marker, colour) in METHODS.items():
        pts = [r for r in records if r.get("method") == method and r.get("macs") is not None
               and r.get("metric") is not None and math.isfinite(r["metric"])]
        if not pts:
            continue
        x = [100 * r["macs"] / full["macs"] if full else r["macs"] for r in pts]
        y = [100 * r["metric"] for r in pts]
        ax.scatter(x, y, marker=marker, color=colour, s=90 if method == "full" else 50, label=label, zorder=3)
        for xi, yi, r in zip(x, y, pts):
            ax.annotate(r.get("run", ""), (xi, yi), fontsize=6, xytext=(3, 3), textcoords="offset points")
    if full and full.get("metric") is not None:
        ax.axhline(100 * full["metric"], color="grey", lw=0.8, ls=":")
    ax.set_xlabel("MACs, % of the full model" if full else "MACs")
    ax.set_ylabel(f"{metric_name} (%)")
    ax.set_xscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(name: str, records: list[dict], out: Path, title: str, metric_name: str,
                  config: Optional[dict] = None, notes: Optional[str] = None, extra: Optional[dict] = None,
                  plot: bool = True) -> None:
    """Write ``out/<name>.json`` (records, :func:`machine_info`, ``config``, ``extra``),
    ``out/<name>.md`` (title, table of :func:`results_table`, ``notes`` markdown, the plot)
    and ``out/<name>.png`` (metric vs MACs % of full, log x, one marker per method).
    Files are written to a temporary name first and renamed (a crash leaves the old ones).
    ``plot=False`` skips the PNG (drawing it costs about a second)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    payload = dict(name=name, title=title, metric_name=metric_name, config=config or {}, machine=machine_info(),
                   records=records, **(extra or {}))
    tmp = out / f".{name}.json.tmp"
    tmp.write_text(json.dumps(json_safe(payload), indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, out / f"{name}.json")
    md = [f"# {title}", "", results_table(records, metric_name), ""]
    if notes:
        md += [notes.rstrip(), ""]
    md += [f"![{metric_name} vs MACs]({name}.png)", ""]
    tmp = out / f".{name}.md.tmp"
    tmp.write_text("\n".join(md))
    os.replace(tmp, out / f"{name}.md")
    if plot:
        tmp = out / f".{name}.tmp.png"
        plot_results(records, tmp, title, metric_name)
        os.replace(tmp, out / f"{name}.png")
