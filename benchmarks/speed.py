"""Speed of dcopt on this machine's CPU (GitHub issue 8), every number a ratio taken in one run.

1. **Gate overhead**: time of a training step (forward + backward + Adam step) of the
   DynamicModel in optimize mode (``dm.optimize_sizes()``, loss + ``dm.complexity_loss()``,
   every κ at 0.7, which leaves every size fractional, so each gate's noise, the RNN unit
   masks and the RNN's per-step recurrent noise all do their full work) divided by the
   original model's, for the speech CRNN (``examples/crnn_speech.py``) and torchvision
   resnet18. Target ≤ 1.15.
2. **Realized speed-up**: inference latency of the exported model at 50 % and 25 % of the
   MACs (one uniform κ for every group, found by bisection on the kept MACs) divided by the
   full model's, against the MACs ratio; with kept widths as they come (``round_to=1``)
   and rounded up to multiples of 8 (``convert(..., round_to=8)``); run as exported, with
   BatchNorm folded (``export(..., fold_batchnorm=True)``), and folded in channels_last
   memory format (model and input; the 4-D models), the full model always run the same
   way. Target: latency ratio ≤ 1.25 × MACs ratio.
3. **Scaling**: seconds of ``dcopt.analyze``, ``dcopt.convert`` and ``dcopt.export`` for
   MLPs (Linear + ReLU) and conv stacks (Conv2d + BatchNorm + ReLU) of 10, 100 and 1000
   layers; the log-log slope against the number of graph nodes (1 = linear).
4. **Peak memory** of ``convert`` + ``export`` (at κ = 0.5) for resnet50 and vit_b_16, in a
   child process per model: the rise of the resident-set high-water mark (VmHWM, reset
   through ``/proc/self/clear_refs`` just before; ``ru_maxrss`` where that is not available)
   over the RSS before convert, divided by the model's parameter bytes.

Timings are repeated and *interleaved* (A, B, B, A, A, B, …); a ratio is the median over
rounds of B/A measured side by side, so load from other processes hits both sides alike; the load average (``os.getloadavg``)
before and after each section and the torch thread count are recorded.

Run::

    .venv/bin/python benchmarks/speed.py                 # ≈ 7–10 min on 2 quiet cores
    .venv/bin/python benchmarks/speed.py --report-only   # re-render speed.md from speed.json
    .venv/bin/python benchmarks/speed.py --threads 2     # all cores of this machine
    .venv/bin/python benchmarks/speed.py --tiny --out /tmp/speed   # seconds (tests)

Writes ``speed.json``, ``speed.md`` and ``speed.png`` (the scaling curves, log-log) to
``--out`` (default benchmarks/results). Sections can be picked with ``--sections``.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))
import dcopt  # noqa: E402
from benchmarks.common import json_safe  # noqa: E402

OUT = Path(__file__).parent / "results"
OVERHEAD_TARGET = 1.15
LATENCY_TARGET = 1.25
SECTIONS = ("overhead", "latency", "profile", "scaling", "memory")

FULL = dict(
    overhead=dict(cases=["crnn", "resnet18"], crnn=dict(batch=32, frames=300), resnet18=dict(batch=8, res=224),
                  warmup=2, repeats=9, kappa=0.7),
    latency=dict(cases=["crnn_b1", "crnn_b32", "resnet18", "resnet50"], targets=[0.5, 0.25], round_to=[1, 8],
                 deploy=["plain", "fold", "fold+cl"], warmup=3, repeats=31),
    profile=dict(cases=[("resnet18", "plain"), ("resnet18", "fold+cl"), ("crnn_b32", "plain")], target=0.25,
                 round_to=8, repeats=10),
    scaling=dict(layers=[10, 100, 1000], repeats={10: 5, 100: 3, 1000: 1}, width=64, channels=16),
    memory=dict(models=["resnet50", "vit_b_16"], kappa=0.5),
)
TINY = dict(
    overhead=dict(cases=["crnn", "resnet18"], crnn=dict(batch=4, frames=20, channels=8, hidden=8),
                  resnet18=dict(batch=2, res=32), warmup=1, repeats=3, kappa=0.7),
    latency=dict(cases=["crnn_b1", "resnet18"], targets=[0.5, 0.25], round_to=[1, 8],
                 deploy=["plain", "fold", "fold+cl"],
                 warmup=1, repeats=3, tiny=True),
    profile=dict(cases=[("resnet18", "plain"), ("resnet18", "fold+cl"), ("crnn_b1", "plain")], target=0.25,
                 round_to=8, repeats=2, tiny=True),
    scaling=dict(layers=[2, 4, 8], repeats={2: 1, 4: 1, 8: 1}, width=8, channels=4),
    memory=dict(models=["mlp"], kappa=0.5),
)


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------

def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def interleaved(fns: dict[str, Callable[[], None]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, alternating them (forward then reversed order
    each round: A B, B A, A B, …) so slow phases of the machine hit every one alike."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            t = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t)
    return times


def med(v: list[float]) -> float:
    return statistics.median(v)


def paired_ratio(base: list[float], other: list[float]) -> float:
    """Median over rounds of other/base measured in the same round (next to each other in
    time): robust to load that changes over seconds, which a ratio of medians is not."""
    return statistics.median(b / a for a, b in zip(base, other))


def spread(v: list[float]) -> float:
    """Half the interquartile range relative to the median: how noisy a series was."""
    if len(v) < 4:
        return (max(v) - min(v)) / (2 * med(v)) if med(v) else 0.0
    q = statistics.quantiles(v, n=4)
    return (q[2] - q[0]) / (2 * med(v)) if med(v) else 0.0


def set_uniform(dm, kappa: float) -> None:
    with torch.no_grad():
        for k in dm.size_parameters():
            k.fill_(kappa)


def kappa_for_macs(dm, target: float) -> tuple[float, float]:
    """The largest uniform κ whose kept MACs fraction is ≤ target (bisection), set on dm."""
    lo, hi = 0.0, 1.0
    for _ in range(25):
        mid = (lo + hi) / 2
        set_uniform(dm, mid)
        if float(dm.complexity(at="kept").macs_fraction) > target:
            hi = mid
        else:
            lo = mid
    set_uniform(dm, max(lo, 1e-6))
    return lo, float(dm.complexity(at="kept").macs_fraction)


# ----------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------

def crnn(channels: int = 64, hidden: int = 96) -> nn.Module:
    from crnn_speech import CRNN
    return CRNN(channels=channels, hidden=hidden)


def crnn_twin(name: str, sizes: dict[str, int]) -> Optional[nn.Module]:
    """The CRNN written by hand (``examples/crnn_speech.py``) at the widths dcopt exported:
    what a user would have built at those widths, to time against the exported model.
    None for other models, or where the two convs kept different widths (the hand-written
    model has one ``channels``)."""
    if not name.startswith("crnn"):
        return None
    convs = {k for n, k in sizes.items() if not n.startswith("gru")}
    gru = [k for n, k in sizes.items() if n.startswith("gru")]
    if len(convs) != 1 or len(gru) != 1:
        return None
    torch.manual_seed(0)
    return crnn(convs.pop(), gru[0]).eval()


def torchvision_model(name: str) -> nn.Module:
    import torchvision
    return torchvision.models.get_model(name, weights=None)


def mlp_stack(layers: int, width: int) -> nn.Sequential:
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*mods, nn.Linear(width, 10))


def conv_stack(layers: int, channels: int) -> nn.Sequential:
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU()]
    return nn.Sequential(*mods, nn.Conv2d(channels, 4, 1))


# ----------------------------------------------------------------------------------------
# 1. gate overhead
# ----------------------------------------------------------------------------------------

def overhead_case(name: str, p: dict) -> dict:
    torch.manual_seed(0)
    c = p[name]
    if name == "crnn":
        model = crnn(c.get("channels", 64), c.get("hidden", 96))
        x = torch.randn(c["batch"], 40, c["frames"])
        y = (torch.rand(c["batch"], c["frames"], 1) > 0.5).float()
        loss_fn = nn.functional.binary_cross_entropy_with_logits
        shape = f"batch {c['batch']} × 40 mels × {c['frames']} frames"
    else:
        model = torchvision_model(name)
        x = torch.randn(c["batch"], 3, c["res"], c["res"])
        y = torch.randint(0, 1000, (c["batch"],))
        loss_fn = nn.functional.cross_entropy
        shape = f"batch {c['batch']} × 3 × {c['res']} × {c['res']}"
    dm = dcopt.convert(model, (x[:2],))
    model.train()
    dm.train()
    dm.optimize_sizes()
    set_uniform(dm, p["kappa"])
    opt_a = torch.optim.Adam(model.parameters(), lr=1e-4)
    opt_b = torch.optim.Adam([{"params": list(dm.weight_parameters()), "lr": 1e-4},
                              {"params": list(dm.size_parameters()), "lr": 0.0}])  # κ stays at p["kappa"]

    def step_original():
        opt_a.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt_a.step()

    def step_dynamic():
        opt_b.zero_grad(set_to_none=True)
        (loss_fn(dm(x), y) + dm.complexity_loss()).backward()
        opt_b.step()

    times = interleaved({"original": step_original, "dynamic": step_dynamic}, p["repeats"], p["warmup"])
    a, b = med(times["original"]), med(times["dynamic"])
    ratio = paired_ratio(times["original"], times["dynamic"])
    row = dict(model=name, input=shape, groups=len(dm.plan.groups),
               gates=sum(isinstance(m, dcopt.gates.FeatureGate) for m in dm.modules()),
               original_s=a, dynamic_s=b, ratio=ratio, ratio_of_medians=b / a, target=OVERHEAD_TARGET,
               met=ratio <= OVERHEAD_TARGET,
               spread_original=spread(times["original"]), spread_dynamic=spread(times["dynamic"]),
               repeats=p["repeats"], times=times)
    print(f"overhead {name:9s} ({shape}): original {a * 1e3:.1f} ms, dynamic {b * 1e3:.1f} ms per step, "
          f"ratio {ratio:.3f} (target ≤ {OVERHEAD_TARGET})", flush=True)
    return row


# ----------------------------------------------------------------------------------------
# 2. realized speed-up
# ----------------------------------------------------------------------------------------

def latency_setup(name: str, tiny: bool):
    torch.manual_seed(0)
    if name.startswith("crnn"):
        batch = int(name.split("_b")[1])
        model = crnn(8, 8) if tiny else crnn()
        return model, torch.randn(batch, 40, 20 if tiny else 300), f"batch {batch} × 40 × {20 if tiny else 300}"
    res = 32 if tiny else 224
    return torchvision_model(name), torch.randn(1, 3, res, res), f"batch 1 × 3 × {res} × {res}"


#: how a model is run for inference (both the full and the exported model, alike):
#: "plain" as exported; "fold" with BatchNorm folded (``export(..., fold_batchnorm=True)``);
#: "fold+cl" folded, model and input in channels_last memory format (4-D inputs only)
DEPLOYS = {"plain": "as exported", "fold": "BN folded", "fold+cl": "BN folded, channels_last"}


def deployed(dm, how: str, x: torch.Tensor) -> Optional[tuple[nn.Module, torch.Tensor]]:
    """``dm`` exported at its current sizes and prepared for inference as ``how`` says
    (:data:`DEPLOYS`); None when ``how`` does not apply (channels_last needs 4-D input)."""
    if how == "fold+cl" and x.dim() != 4:
        return None
    model = dcopt.export(dm, fold_batchnorm=how != "plain").eval()
    if how == "fold+cl":
        return model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    return model, x


def latency_case(name: str, p: dict) -> list[dict]:
    model, x, shape = latency_setup(name, p.get("tiny", False))
    model.eval()
    full_macs = dcopt.count_macs(model, (x,))
    variants: dict[str, tuple[nn.Module, torch.Tensor]] = {"full/plain": (model, x)}
    info = {}
    deploys = p.get("deploy", ["plain"])
    for r in p["round_to"]:
        dm = dcopt.convert(model, (x,), round_to=r)
        for t in p["targets"]:
            kappa, frac = kappa_for_macs(dm, t)
            sizes = {n: i.kept for n, i in dm.sizes().items()}
            for how in deploys:
                run = deployed(dm, how, x)
                if run is None:
                    continue
                key = f"{t:g}/round{r}/{how}"
                variants[key] = run
                info[key] = dict(target=t, round_to=r, deploy=how, kappa=kappa,
                                 macs_fraction=dcopt.count_macs(run[0], (x,)) / full_macs,
                                 predicted_fraction=frac, kept_widths=sorted(set(sizes.values())), group_sizes=sizes,
                                 params_fraction=sum(q.numel() for q in run[0].parameters())
                                 / sum(q.numel() for q in model.parameters()))
    # controls (is any of the gap ours?): the export at κ = 1, the same graph as the
    # original; for the CRNN, the model written by hand at the exported widths. Each
    # deployment compares with the full model deployed alike (a user would fold the full
    # model too): the export at κ = 1, folded and laid out the same way.
    dm = dcopt.convert(model, (x,))
    set_uniform(dm, 1.0)
    variants["export@1"] = (dcopt.export(dm).eval(), x)
    for how in deploys:
        if how != "plain" and (run := deployed(dm, how, x)) is not None:
            variants[f"full/{how}"] = run
    for key, d in info.items():
        twin = crnn_twin(name, d["group_sizes"]) if d["deploy"] == "plain" else None
        if twin is not None:
            variants[f"twin/{key}"] = (twin, x)
    fns = {k: (lambda m=m, xs=xs: m(xs)) for k, (m, xs) in variants.items()}
    with torch.inference_mode():
        times = interleaved(fns, p["repeats"], p["warmup"])
    export_at_full = paired_ratio(times["full/plain"], times["export@1"])
    full_deployed = {how: paired_ratio(times["full/plain"], times[f"full/{how}"])
                     for how in deploys if f"full/{how}" in times}
    rows = []
    for key, d in info.items():
        base = f"full/{d['deploy']}"
        full = med(times[base])
        lat = paired_ratio(times[base], times[key])
        d = dict(d, export_at_full_ratio=export_at_full, full_deployed_over_original=full_deployed,
                 exported_over_twin=paired_ratio(times[f"twin/{key}"], times[key]) if f"twin/{key}" in times else None)
        rows.append(dict(model=name, input=shape, **d, full_ms=full * 1e3, ms=med(times[key]) * 1e3,
                         latency_ratio=lat, speedup=1 / lat, macs_speedup=1 / d["macs_fraction"],
                         latency_over_macs=lat / d["macs_fraction"],
                         met=lat / d["macs_fraction"] <= LATENCY_TARGET, spread=spread(times[key]),
                         spread_full=spread(times[base]), repeats=p["repeats"]))
        rows[-1]["latency_ratio_of_medians"] = med(times[key]) / full
        print(f"latency  {name:9s} {key:20s}: MACs {d['macs_fraction']:.3f}, latency {lat:.3f} of full "
              f"({full * 1e3:.2f} ms → {med(times[key]) * 1e3:.2f} ms), latency/MACs {lat / d['macs_fraction']:.2f} "
              f"(target ≤ {LATENCY_TARGET})", flush=True)
    return rows


# ----------------------------------------------------------------------------------------
# 2b. where the time goes (why latency does not fall with the MACs)
# ----------------------------------------------------------------------------------------

OP_FAMILIES = (("conv", ("conv",)), ("rnn", ("gru", "lstm", "rnn")), ("pool", ("pool",)),
               ("norm", ("batch_norm", "layer_norm")), ("linear", ("addmm", "linear", "matmul", "mm")))


def _family(op: str) -> str:
    name = op.lower()
    return next((fam for fam, keys in OP_FAMILIES if any(k in name for k in keys)), "other")


def _self_cpu_by_family(model: nn.Module, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Self CPU time (s) per op family over ``repeats`` inference calls (torch.profiler); ops
    run inside an RNN op count as the RNN's."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                model(x)
    out: dict[str, float] = {}
    for e in prof.events():
        fam = _family(e.name)
        parent = e.cpu_parent
        while parent is not None:            # a GRU's matmuls and sigmoids are the GRU's time
            if _family(parent.name) == "rnn":
                fam = "rnn"
            parent = parent.cpu_parent
        out[fam] = out.get(fam, 0.0) + e.self_cpu_time_total / 1e6
    return out


def profile_case(name: str, how: str, p: dict) -> dict:
    """Per op family: share of the full model's time, and exported/full time against the
    MACs ratio — which ops follow the MACs down and which do not. ``how``: both models
    run as :data:`DEPLOYS` says."""
    model, x, shape = latency_setup(name, p.get("tiny", False))
    model.eval()
    full_macs = dcopt.count_macs(model, (x,))
    dm = dcopt.convert(model, (x,), round_to=p["round_to"])
    set_uniform(dm, 1.0)
    if how != "plain":
        run = deployed(dm, how, x)
        if run is None:
            raise ValueError(f"profile case {name}: {DEPLOYS[how]!r} does not apply to its {x.dim()}-D input")
        model, x = run          # x in the layout the deployment runs on
    kappa_for_macs(dm, p["target"])
    small, _ = deployed(dm, how, x)
    macs = dcopt.count_macs(small, (x,)) / full_macs
    full, cut = _self_cpu_by_family(model, x, p["repeats"]), _self_cpu_by_family(small, x, p["repeats"])
    total = sum(full.values())
    fams = {f: dict(share_of_full=full[f] / total, time_ratio=cut.get(f, 0.0) / full[f]) for f in full}
    print(f"profile  {name:9s} at {macs:.3f} MACs ({DEPLOYS[how]}): " + ", ".join(
        f"{f} {d['share_of_full']:.0%} of full, ×{d['time_ratio']:.2f}" for f, d in sorted(fams.items())), flush=True)
    return dict(model=name, input=shape, target=p["target"], round_to=p["round_to"], deploy=how,
                macs_fraction=macs, time_ratio=sum(cut.values()) / total, families=fams)


# ----------------------------------------------------------------------------------------
# 3. scaling
# ----------------------------------------------------------------------------------------

def slope(xs: list[float], ys: list[float]) -> float:
    lx = [math.log(v) for v in xs]
    ly = [math.log(max(v, 1e-9)) for v in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def scaling_kind(kind: str, p: dict) -> dict:
    points = []
    for L in p["layers"]:
        torch.manual_seed(0)
        if kind == "mlp":
            model, x = mlp_stack(L, p["width"]), torch.randn(2, p["width"])
        else:
            model, x = conv_stack(L, p["channels"]), torch.randn(1, p["channels"], 8, 8)
        reps = p["repeats"][L]
        t = {"analyze": [], "convert": [], "export": []}
        nodes = None
        for _ in range(reps):
            gc.collect()
            t0 = time.perf_counter()
            a = dcopt.analyze(model, (x,))
            t1 = time.perf_counter()
            dm = dcopt.convert(model, (x,))
            t2 = time.perf_counter()
            set_uniform(dm, 0.5)
            t3 = time.perf_counter()
            dcopt.export(dm)
            t4 = time.perf_counter()
            t["analyze"].append(t1 - t0)
            t["convert"].append(t2 - t1)
            t["export"].append(t4 - t3)
            nodes = len(a.graph)
            del a, dm
        pt = dict(layers=L, nodes=nodes, repeats=reps, **{k: med(v) for k, v in t.items()})
        points.append(pt)
        print(f"scaling  {kind:4s} {L:5d} layers ({nodes} nodes): analyze {pt['analyze']:.3f} s, convert "
              f"{pt['convert']:.3f} s, export {pt['export']:.3f} s", flush=True)
    nodes = [q["nodes"] for q in points]
    slopes = {k: slope(nodes, [q[k] for q in points]) for k in ("analyze", "convert", "export")}
    last = {k: slope(nodes[-2:], [q[k] for q in points[-2:]]) for k in slopes}
    print(f"scaling  {kind:4s} log-log slope (all points): " + ", ".join(f"{k} {v:.2f}" for k, v in slopes.items())
          + "; last two: " + ", ".join(f"{k} {v:.2f}" for k, v in last.items()), flush=True)
    return dict(kind=kind, points=points, slope=slopes, slope_last=last)


# ----------------------------------------------------------------------------------------
# 4. peak memory (one child process per model)
# ----------------------------------------------------------------------------------------

def _status_kb(field: str) -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _hwm_bytes(reset_ok: bool) -> int:
    kb = _status_kb("VmHWM") if reset_ok else None
    return 1024 * (kb if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def memory_child(name: str, kappa: float) -> dict:
    """Runs in the child: build the model, then convert and export, watching the RSS peak."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if name == "mlp":
        model, x = mlp_stack(4, 64), torch.randn(2, 64)
    else:
        model = torchvision_model(name).eval()
        x = torch.randn(1, 3, 224, 224)
    # imports and first-call caches of dcopt and torch are not convert's memory
    dcopt.export(dcopt.convert(mlp_stack(2, 8), (torch.randn(2, 8),)))
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    gc.collect()
    rss0 = 1024 * (_status_kb("VmRSS") or 0)
    reset_ok = _reset_hwm()
    t0 = time.perf_counter()
    dm = dcopt.convert(model, (x,))
    t1 = time.perf_counter()
    peak_convert = _hwm_bytes(reset_ok)
    rss_after_convert = 1024 * (_status_kb("VmRSS") or 0)
    set_uniform(dm, kappa)
    t2 = time.perf_counter()
    small = dcopt.export(dm)
    t3 = time.perf_counter()
    peak_total = _hwm_bytes(reset_ok)
    small_bytes = sum(p.numel() * p.element_size() for p in small.parameters())
    return dict(model=name, param_bytes=param_bytes, buffer_bytes=buffer_bytes, exported_param_bytes=small_bytes,
                rss_before=rss0, rss_after_convert=rss_after_convert, peak_convert=peak_convert,
                peak_total=peak_total, hwm_reset=reset_ok, convert_s=t1 - t0, export_s=t3 - t2,
                groups=len(dm.plan.groups), kappa=kappa)


def memory_case(name: str, p: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory-child", name, "--kappa", str(p["kappa"])]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT), timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"memory child for {name} failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    pb = r["param_bytes"]
    r["convert_peak_over_params"] = (r["peak_convert"] - r["rss_before"]) / pb
    r["total_peak_over_params"] = (r["peak_total"] - r["rss_before"]) / pb
    r["convert_kept_over_params"] = (r["rss_after_convert"] - r["rss_before"]) / pb
    print(f"memory   {name:9s}: parameters {pb / 2**20:.1f} MiB; peak RSS rise convert {r['convert_peak_over_params']:.2f}×, "
          f"convert + export {r['total_peak_over_params']:.2f}× the parameter bytes "
          f"(convert {r['convert_s']:.1f} s, export {r['export_s']:.1f} s)", flush=True)
    return r


# ----------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------

def plot(scaling: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(1, len(scaling)), figsize=(5.5 * max(1, len(scaling)), 4.2), squeeze=False)
    for ax, s in zip(axes[0], scaling):
        n = [q["nodes"] for q in s["points"]]
        for k, c in (("analyze", "tab:blue"), ("convert", "tab:orange"), ("export", "tab:green")):
            ax.loglog(n, [q[k] for q in s["points"]], "o-", color=c, label=f"{k} (slope {s['slope'][k]:.2f})")
        ref = s["points"][-1]["convert"]
        ax.loglog(n, [ref * v / n[-1] for v in n], "k:", lw=1, label="linear (slope 1)")
        ax.set_xlabel("graph nodes")
        ax.set_ylabel("seconds")
        ax.set_title(f"{s['kind']} stack ({', '.join(str(q['layers']) for q in s['points'])} layers)")
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def latency_summary(rows: list[dict]) -> list[str]:
    """Per model and way of running: how many (target, rounding) rows meet the target, and
    the range of latency / MACs."""
    seen: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        seen.setdefault((r["model"], r.get("deploy", "plain")), []).append(r)
    parts = [f"{model} {DEPLOYS[how]}: {sum(r['met'] for r in rs)} of {len(rs)} "
             f"({min(r['latency_over_macs'] for r in rs):.2f}–{max(r['latency_over_macs'] for r in rs):.2f})"
             for (model, how), rs in seen.items()]
    return ["Target met, per model and way of running (rows meeting it, of all targets and roundings; range of "
            "latency / MACs): " + "; ".join(parts) + ".", ""]


def latency_controls(rows: list[dict]) -> list[str]:
    """Table 2c: how much of the latency gap is dcopt's own doing."""
    if not rows or "export_at_full_ratio" not in rows[0]:
        return []
    lines = ["### 2c. Is any of the gap ours?", "",
             "Two controls timed in the same rounds: the export at κ = 1 (the original graph, rebuilt by "
             "`dcopt.export`) against the original model; and, for the CRNN, the exported model against the "
             "same CRNN written by hand (`examples/crnn_speech.py`) at the exported widths. A ratio of 1 means "
             "the export costs nothing beyond its widths. Beside them, what each way of running it gains on "
             "the full model (full model run that way / original as is).", "",
             "| model | input | export at κ = 1 / original | full model deployed / original "
             "| exported / hand-written, per target (rounding) |",
             "|---|---|---|---|---|"]
    seen = {}
    for r in rows:
        seen.setdefault((r["model"], r["input"]), []).append(r)
    for (model, inp), rs in seen.items():
        twins = ", ".join(f"{r['target']:.0%} ({r['round_to']}): {r['exported_over_twin']:.3f}"
                          for r in rs if r.get("exported_over_twin") is not None) or "–"
        dep = ", ".join(f"{DEPLOYS[h]}: {v:.3f}" for h, v in rs[0].get("full_deployed_over_original", {}).items()
                        if h != "plain") or "–"
        lines.append(f"| {model} | {inp} | {rs[0]['export_at_full_ratio']:.3f} | {dep} | {twins} |")
    return lines + [""]


def markdown(res: dict) -> str:
    m = res["meta"]
    busy = [v for sec in res["load"].values() for v in (sec["before"][0], sec["after"][0])]
    # the load average counts this benchmark's own runnable threads too
    loaded = any(v > m["threads"] + 0.7 for v in busy)
    lines = ["# dcopt speed on this machine's CPU (issue 8)", "",
             f"`benchmarks/speed.py{' --tiny' if res['tiny'] else ''}`: torch {m['torch']}, {m['threads']} torch "
             f"thread(s), {m['cpus']} CPU(s) ({m['cpu']}), Python {m['python']}; {res['seconds']:.0f} s in all. "
             "Every ratio is taken within this run: the median over rounds of interleaved repeats of the ratio "
             "measured side by side in each round; milliseconds are medians.", ""]
    if loaded:
        lines += [f"**The machine was loaded during this run** (1-minute load average up to {max(busy):.2f} on "
                  f"{m['cpus']} cores, {m['threads']} of it this run's own threads): the values are provisional; rerun "
                  "`benchmarks/speed.py` on a quiet machine.", ""]
    if res["tiny"]:
        lines += ["*Tiny smoke run (toy sizes): the numbers say nothing about speed.*", ""]
    lines += ["Load average (1, 5, 15 min) before → after each section: " + "; ".join(
        f"{k} {v['before']} → {v['after']}" for k, v in res["load"].items()) + ".", ""]
    if res.get("overhead"):
        lines += ["## 1. Gate overhead in training (target ≤ %.2f)" % OVERHEAD_TARGET, "",
                  "Forward + backward + Adam step; DynamicModel in optimize mode (noise on, every κ = "
                  f"{res['config']['overhead']['kappa']}: every size fractional, so every gate and the GRU's "
                  "per-step recurrent noise are active), loss + `complexity_loss()`, against the original model.", "",
                  "| model | input | groups | gates | original (ms) | DynamicModel (ms) | ratio | met |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in res["overhead"]:
            lines.append(f"| {r['model']} | {r['input']} | {r['groups']} | {r['gates']} | {r['original_s'] * 1e3:.1f} "
                         f"± {r['spread_original']:.0%} | {r['dynamic_s'] * 1e3:.1f} ± {r['spread_dynamic']:.0%} | "
                         f"**{r['ratio']:.3f}** | {'yes' if r['met'] else '**no**'} |")
        lines += ["", "± : half the interquartile range over the repeats, relative to the median.", ""]
    if res.get("latency"):
        lines += ["## 2. Realized speed-up of the exported model (target: latency ratio ≤ %.2f × MACs ratio)"
                  % LATENCY_TARGET, "",
                  "Inference (`torch.inference_mode`, eval); one uniform κ for all groups, the largest whose kept "
                  "MACs are ≤ the target; MACs counted on the exported model. `rounding 8`: "
                  "`convert(..., round_to=8)`, kept widths rounded up to multiples of 8. `run as`: the exported "
                  "model as it comes; with BatchNorm folded (`export(..., fold_batchnorm=True)`: each BatchNorm "
                  "after a convolution folded into its weights, for inference); and folded, model and input in "
                  "channels_last memory format (`.to(memory_format=torch.channels_last)`, the 4-D models). The "
                  "full model is run the same way in each row (its `full (ms)`).", "",
                  "| model | input | target | rounding | run as | MACs | params | full (ms) | exported (ms) "
                  "| latency ratio | latency / MACs | kept widths | met |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        order = list(DEPLOYS)
        for r in sorted(res["latency"], key=lambda r: order.index(r.get("deploy", "plain"))):
            w = r["kept_widths"]
            ws = ", ".join(map(str, w)) if len(w) <= 6 else ", ".join(map(str, w[:5])) + f", … ({len(w)})"
            lines.append(f"| {r['model']} | {r['input']} | {r['target']:.0%} | {r['round_to']} | "
                         f"{DEPLOYS[r.get('deploy', 'plain')]} | {r['macs_fraction']:.3f} "
                         f"| {r['params_fraction']:.3f} | {r['full_ms']:.2f} | {r['ms']:.2f} ± {r['spread']:.0%} | "
                         f"{r['latency_ratio']:.3f} | **{r['latency_over_macs']:.2f}** | {ws} | "
                         f"{'yes' if r['met'] else '**no**'} |")
        lines += [""]
        lines += latency_summary(res["latency"])
        lines += latency_controls(res["latency"])
    if res.get("profile"):
        lines += ["## 2b. Where the time goes", "",
                  "torch.profiler self CPU time per op family, full model vs the exported model at the target "
                  "MACs: the family's share of the full model's time, and its exported/full time ratio (to "
                  "compare with the MACs ratio).", "",
                  "| model | input | run as | MACs ratio | time ratio | " + " | ".join(f for f, _ in OP_FAMILIES)
                  + " | other |", "|---|---|---|---|---|" + "---|" * (len(OP_FAMILIES) + 1)]
        for r in res["profile"]:
            cells = []
            for f in [f for f, _ in OP_FAMILIES] + ["other"]:
                d = r["families"].get(f)
                cells.append(f"{d['share_of_full']:.0%}, ×{d['time_ratio']:.2f}" if d else "–")
            lines.append(f"| {r['model']} | {r['input']} | {DEPLOYS[r.get('deploy', 'plain')]} | "
                         f"{r['macs_fraction']:.3f} | {r['time_ratio']:.3f} | "
                         + " | ".join(cells) + " |")
        lines += [""]
    if res.get("scaling"):
        lines += ["## 3. Scaling with the number of layers", "",
                  "| stack | layers | nodes | analyze (s) | convert (s) | export (s) |", "|---|---|---|---|---|---|"]
        for s in res["scaling"]:
            for q in s["points"]:
                lines.append(f"| {s['kind']} | {q['layers']} | {q['nodes']} | {q['analyze']:.3f} | {q['convert']:.3f} "
                             f"| {q['export']:.3f} |")
        lines += ["", "Log-log slope of seconds against nodes (1 = linear, 2 = quadratic), fitted over all points "
                  "and over the last two (the asymptote):", "",
                  "| stack | analyze | convert | export |", "|---|---|---|---|"]
        for s in res["scaling"]:
            lines.append(f"| {s['kind']} | " + " | ".join(f"{s['slope'][k]:.2f} (last {s['slope_last'][k]:.2f})"
                                                       for k in ("analyze", "convert", "export")) + " |")
        lines += ["", "![scaling](speed.png)", ""]
    if res.get("memory"):
        lines += ["## 4. Peak memory of convert + export", "",
                  "Rise of the resident-set high-water mark over the RSS before `convert`, in a fresh child "
                  "process per model (model built, example input batch 1), divided by the model's parameter "
                  f"bytes; export at κ = {res['config']['memory']['kappa']}.", "",
                  "| model | parameters (MiB) | peak rise: convert | peak rise: convert + export | "
                  "RSS kept after convert | exported params (MiB) | convert (s) | export (s) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in res["memory"]:
            lines.append(f"| {r['model']} | {r['param_bytes'] / 2**20:.1f} | {r['convert_peak_over_params']:.2f}× | "
                         f"**{r['total_peak_over_params']:.2f}×** | {r['convert_kept_over_params']:.2f}× | "
                         f"{r['exported_param_bytes'] / 2**20:.1f} | {r['convert_s']:.1f} | {r['export_s']:.1f} |")
        lines += [""]
    if res.get("notes"):
        lines += ["## Notes", ""] + [f"* {n}" for n in res["notes"]] + [""]
    return "\n".join(lines)





NOTES = [
    "Overhead: the DynamicModel always computes at full width in training; what it adds are the gates' "
    "passes over each gated tensor and, at κ < 1, the GRU's weight masks (`GatedRNN`; at κ = 1 the GRU runs "
    "unmasked). Profiled (torch.profiler, resnet18, batch 8): the noisy gate was written as mask × scale, "
    "`where` and an out-of-place `index_add` of the noise — seven passes over the whole tensor per gate "
    "and step, forward and backward. It is now one autograd op (`dcopt.gates._NoisyGate`: one `where` "
    "forward, one backward, the rest on the boundary channel only; same values and gradients, "
    "tests/test_gate_op.py): one gate on an 8×64×56×56 tensor, forward + backward, 37 ms → 7 ms above a "
    "plain pass (measured once, during that change). Step ratio before → after (separate runs, loaded machine): resnet18 1.10 → 1.09, "
    "CRNN 1.05 → 1.01 — within the noise of a loaded machine; the gates were already a small share.",
    "Latency (table 2b, measured by this script): as exported (NCHW), the convolutions' time falls with their "
    "MACs; what does not fall as fast are the ops whose cost is linear in the width, not quadratic — in "
    "resnet18 the stem's max-pool above all, then batch norms, ReLUs, residual adds and per-op dispatch. The "
    "max-pool's share is torch's NCHW max-pool kernel: in channels_last the same pool takes about 1 % of the "
    "time (2b). So the exported model is best run as a deployed model would be: BatchNorm folded "
    "(`export(..., fold_batchnorm=True)`, which removes the batch norms) and, for image models, model and input "
    "in channels_last; the full model run the same way gains too (2c), and the ratio is taken against it. "
    "In the CRNN nearly all the time is the bidirectional GRU, which runs one "
    "time step after another; per step its gate nonlinearities (linear in the hidden size) and fixed per-step "
    "costs do not shrink with the MACs (quadratic in the hidden size): at batch 1 (streaming) the exported "
    "model gains little, at batch 32 the matrix products dominate and the speed-up follows the MACs more "
    "closely. The exported CRNN runs as fast as the same CRNN written by hand at its widths (2c): that gap is "
    "torch's GRU kernel, not the export's.",
    "round_to=8 (`convert(..., round_to=8)`, kept widths rounded up to multiples of 8 in the DynamicModel "
    "itself, so eval mode still equals the export) helps wherever widths like 31, 45 or 67 came out: kernels "
    "fill their 8-wide AVX2 vectors (compare rounding 1 and 8 in the table: the same target, most of all "
    "the CRNN at batch 32 and resnet18 at 50 %).",
    "Fixed after profiling (cProfile) the scaling section — before → after (measured once, during those changes, "
    "in separate runs on the loaded machine), "
    "1000-layer stacks, 1 thread: "
    "export rebuilt a table of all group sizes for every sliced tensor (quadratic; MLP 5.5 s → 2.8 s, "
    "conv 9.0 s → 3.9 s); the analysis listed each group's producers by scanning every group (quadratic; "
    "analyze MLP 4.2 s → 2.3 s); rewrite built a table of all groups per gate and scanned the graph per RNN. "
    "Slope over the last decade before: 1.23–1.32 (MLP), after: 0.9–1.1.",
    "Fixed after measuring peak memory: export deep-copied the whole gated model and then the user's whole "
    "module tree before slicing; it now copies neither the tensors it slices nor the leaf modules it "
    "already holds. Peak rise of convert + export: resnet50 2.77× → 1.73×, vit_b_16 2.11× → 1.95× the "
    "parameter bytes (what remains: convert's copy of the model, which leaves the user's model untouched, "
    "and the exported model itself).",
]


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (toy sizes; says nothing about speed)")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--report-only", action="store_true",
                    help="re-render speed.md (and speed.png) from --out/speed.json with the current notes; "
                         "measures nothing")
    ap.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--kappa", type=float, default=0.5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.kappa)))
        return 0

    if args.report_only:
        path = args.out / "speed.json"
        res = json.loads(path.read_text())
        res["notes"] = list(NOTES)
        path.write_text(json.dumps(res, indent=1, ensure_ascii=False) + "\n")
        (args.out / "speed.md").write_text(markdown(res))
        if res.get("scaling"):
            plot(res["scaling"], args.out / "speed.png")
        print(f"re-rendered {args.out / 'speed.md'} from {path}")
        return 0
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads_before)


def _run(args) -> int:
    p = copy.deepcopy(TINY if args.tiny else FULL)
    t_start = time.perf_counter()
    res: dict = dict(tiny=args.tiny, config=p, load={},
                     meta=dict(torch=torch.__version__, python=platform.python_version(),
                               threads=torch.get_num_threads(), interop_threads=torch.get_num_interop_threads(),
                               cpus=os.cpu_count(), cpu=cpu_name(), started=time.strftime("%Y-%m-%d %H:%M:%S %Z")),
                     notes=list(NOTES))
    dcopt.analyze(nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3)), (torch.randn(1, 3),))  # imports
    for section in args.sections:
        before = load()
        if section == "overhead":
            res["overhead"] = [overhead_case(n, p["overhead"]) for n in p["overhead"]["cases"]]
        elif section == "latency":
            res["latency"] = [r for n in p["latency"]["cases"] for r in latency_case(n, p["latency"])]
        elif section == "profile":
            res["profile"] = [profile_case(n, how, p["profile"]) for n, how in p["profile"]["cases"]]
        elif section == "scaling":
            res["scaling"] = [scaling_kind(k, p["scaling"]) for k in ("mlp", "conv")]
        elif section == "memory":
            res["memory"] = [memory_case(n, p["memory"]) for n in p["memory"]["models"]]
        res["load"][section] = dict(before=before, after=load())
    res["seconds"] = time.perf_counter() - t_start
    res["config"]["scaling"]["repeats"] = {str(k): v for k, v in p["scaling"]["repeats"].items()}
    args.out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(json_safe(res, 5), indent=1, ensure_ascii=False)
    (args.out / "speed.json").write_text(text + "\n")
    # rendered from the JSON as written (rounded), so --report-only renders the same report
    (args.out / "speed.md").write_text(markdown(json.loads(text)))
    if res.get("scaling"):
        plot(res["scaling"], args.out / "speed.png")
    print(f"wrote {args.out / 'speed.json'}, speed.md" + (", speed.png" if res.get("scaling") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
