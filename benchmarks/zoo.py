"""Model-zoo coverage: every torchvision classification model converts and exports exactly, or says why not.

For each model (weights=None, input 1×3×224×224, 299 for inception_v3): analyze → convert →
random integer sizes in every group (30–90 % of N) → export → compare the eval-mode gated
model with the exported model, and the exported model's MACs (FlopCounterMode) with
``complexity()``; then the same export with BatchNorm folded (``fold_batchnorm=True``)
against the gated model, and how many BatchNorms it folded. Side by side: Torch-Pruning building its dependency graph and pruning
50 % of channels. Run by hand:

    .venv/bin/python benchmarks/zoo.py                     # all 80 models
    .venv/bin/python benchmarks/zoo.py --models resnet18 vit_b_16
    .venv/bin/python benchmarks/zoo.py --skip-largest      # skip models above 60 GMACs... (see --max-params)

Writes benchmarks/results/zoo.json and zoo.md.
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
import traceback
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dcopt  # noqa: E402
from dcopt.numcheck import max_relative_error  # noqa: E402

OUT = Path(__file__).parent / "results"
LARGE = {"vit_h_14", "regnet_y_128gf", "vit_l_16", "vit_l_32", "regnet_y_32gf", "regnet_y_16gf",
         "efficientnet_v2_l", "convnext_large", "swin_v2_b", "swin_b", "vit_b_16", "vit_b_32", "maxvit_t",
         "efficientnet_b7", "efficientnet_b6", "regnet_x_32gf", "vgg19_bn", "vgg19", "vgg16_bn", "vgg16",
         "wide_resnet101_2", "resnext101_64x4d", "resnext101_32x8d", "convnext_base", "swin_v2_s", "swin_s",
         "efficientnet_v2_m", "efficientnet_b5"}


def input_for(name: str):
    size = 299 if name == "inception_v3" else 224
    return (torch.randn(1, 3, size, size),)


def build(name: str):
    kwargs = {"weights": None}
    if name in ("inception_v3", "googlenet"):
        kwargs["aux_logits"] = False
        kwargs["init_weights"] = False
    return torchvision.models.get_model(name, **kwargs).eval()


def run_dcopt(name: str, seed: int = 0) -> dict:
    rec = dict(model=name)
    torch.manual_seed(seed)
    model = build(name)
    x = input_for(name)
    t = time.perf_counter()
    try:
        a = dcopt.analyze(model, x)
    except dcopt.DcoptError as exc:
        rec.update(outcome="rejected", reasons=[str(exc)[:300]])
        return rec
    rec["t_analyze"] = time.perf_counter() - t
    rec.update(shape_check(model, x))
    rec["macs"] = a.macs
    rec["dynamic_fraction"] = a.dynamic_fraction
    rec["groups"] = len(a.groups)
    rec["dynamic_groups"] = len(a.dynamic_groups)
    rec["unsupported"] = sorted({f"{r.op}: {r.reason}" for r in a.unsupported})[:12]
    if not a.convertible:
        rec.update(outcome="rejected", reasons=rec["unsupported"] or ["no dynamic group"])
        return rec
    t = time.perf_counter()
    dm = dcopt.convert(model, x)
    rec["t_convert"] = time.perf_counter() - t
    rng = random.Random(seed)
    sizes = {g.name: rng.randint(max(1, int(0.3 * g.width)), max(1, int(0.9 * g.width))) for g in dm.plan.groups}
    dm.set_sizes(sizes)
    t = time.perf_counter()
    small = dcopt.export(dm, verify=False, keep_class=False)
    rec["t_export"] = time.perf_counter() - t
    dm.eval()
    small.eval()
    with torch.no_grad():
        ref = dm(*x)
        got = small(*x)
    err = max_relative_error(ref, got)
    rec["rel_error"] = err
    predicted = dm.complexity("kept").macs.item()
    counted = dcopt.count_macs(small, x)
    rec["macs_after"] = counted
    rec["macs_predicted"] = predicted
    ok_macs = abs(counted - predicted) <= 1e-6 * max(1.0, predicted)
    del small
    folded = dcopt.export(dm, verify=False, keep_class=False, fold_batchnorm=True).eval()
    with torch.no_grad():
        fold_err = max_relative_error(ref, folded(*x))
    rec["fold_rel_error"] = fold_err
    rec["batchnorms"] = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    rec["batchnorms_folded"] = rec["batchnorms"] - sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                                                       for m in folded.modules())
    if err is None or err > 1e-4 or not ok_macs:
        rec.update(outcome="mismatch", detail=f"rel_error={err}, macs counted={counted} predicted={predicted}")
    elif fold_err is None or fold_err > 1e-4:
        rec.update(outcome="mismatch", detail=f"BatchNorm folded: rel_error={fold_err}")
    else:
        rec["outcome"] = "exact"
    return rec


def shape_check(model, x) -> dict:
    """Which shape propagation the analysis takes (``dcopt/shape_only.py``: convs and
    linears on meta tensors where provably safe) and whether it gives the shapes, dtypes,
    result types and MACs of the real run (untimed)."""
    from dcopt.shape_only import node_shapes
    from dcopt.trace import propagate_shapes, trace

    gm = trace(model, None, lazy_code=True).gm
    fast = propagate_shapes(gm, x), node_shapes(gm)
    path = gm.meta["shape_propagation"]
    real = propagate_shapes(gm, x, count_all=True), node_shapes(gm)
    return dict(shape_propagation=path, shapes_match_real=fast == real)


def run_torch_pruning_isolated(name: str, mem_gb: float = 8.0, timeout: float = 600.0) -> dict:
    """Torch-Pruning in a child process with a memory cap and a time limit: on some models
    (swin_t) its shape inference recurses without bound and would take the machine down."""
    import subprocess

    cmd = [sys.executable, __file__, "--tp-only", name, "--tp-mem-gb", str(mem_gb)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(tp_outcome=f"failed: did not finish in {timeout:.0f} s")
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr.strip().splitlines() or ["?"])[-1][:150]
        return dict(tp_outcome=f"failed: exit {out.returncode} ({tail})")
    return json.loads(lines[-1])


def run_torch_pruning(name: str) -> dict:
    try:
        import torch_pruning as tp
    except ImportError:
        return dict(tp_outcome="not installed")
    model = build(name)
    x = input_for(name)
    rec = {}
    try:
        t = time.perf_counter()
        tp.DependencyGraph().build_dependency(model, example_inputs=x)
        rec["tp_t_graph"] = time.perf_counter() - t
        ignored = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 1000]
        pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                                           pruning_ratio=0.5, ignored_layers=ignored)
        t = time.perf_counter()
        pruner.step()
        rec["tp_t_prune"] = time.perf_counter() - t
        with torch.no_grad():
            model(*x)
        macs, _ = tp.utils.count_ops_and_params(model, x)
        rec["tp_outcome"] = "pruned"
        rec["tp_macs_after"] = int(macs)
    except Exception as exc:  # record, never stop the benchmark
        rec["tp_outcome"] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
    return rec


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", help="subset of model names")
    p.add_argument("--skip-largest", action="store_true", help=f"skip the {len(LARGE)} largest models")
    p.add_argument("--no-torch-pruning", action="store_true")
    p.add_argument("--torch-pruning-only", action="store_true",
                   help="keep the recorded dcopt results; run Torch-Pruning for the models (default: those "
                        "without a Torch-Pruning record)")
    p.add_argument("--out", default=str(OUT / "zoo.json"),
                   help="the results JSON (zoo.md goes next to it); a directory means DIR/zoo.json")
    p.add_argument("--tp-only", help=argparse.SUPPRESS)
    p.add_argument("--tp-mem-gb", type=float, default=8.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tp_only:
        import resource

        cap = int(args.tp_mem_gb * 2 ** 30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        print(json.dumps(run_torch_pruning(args.tp_only), default=str))
        return
    out = Path(args.out)
    if out.is_dir() or not out.suffix:
        out = out / "zoo.json"
    names = args.models or torchvision.models.list_models(module=torchvision.models)
    if args.skip_largest:
        names = [n for n in names if n not in LARGE]
    if args.torch_pruning_only:
        return _torch_pruning_only(names, out, explicit=bool(args.models))
    records = []
    for name in names:
        t0 = time.perf_counter()
        try:
            rec = run_dcopt(name)
        except Exception as exc:
            rec = dict(model=name, outcome="crashed", detail=f"{type(exc).__name__}: {exc}"[:500],
                       traceback=traceback.format_exc()[-1500:])
        if not args.no_torch_pruning:
            rec.update(run_torch_pruning_isolated(name))
        rec["t_total"] = time.perf_counter() - t0
        records.append(rec)
        _save(records, out)  # after every model: a crash loses nothing
        print(f"{name:28s} {rec['outcome']:9s} dyn={rec.get('dynamic_fraction', 0):.0%} "
              f"tp={rec.get('tp_outcome', '-')[:30]} {rec['t_total']:.1f}s "
              f"{rec.get('detail', '')[:150]}", flush=True)
        gc.collect()


def _torch_pruning_only(names, out: Path, explicit: bool):
    """Fill in the Torch-Pruning side of recorded models (a full zoo run takes hours on 2 cores)."""
    recorded = {r["model"]: r for r in json.loads(out.read_text())} if out.exists() else {}
    for name in names:
        rec = recorded.get(name)
        if rec is None or (not explicit and "tp_outcome" in rec):
            continue
        rec.update(run_torch_pruning_isolated(name))
        _save([rec], out)
        print(f"{name:28s} tp={rec['tp_outcome'][:60]} graph={rec.get('tp_t_graph', float('nan')):.2f}s", flush=True)


def _save(records, out: Path):
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():  # keep the records of models not run this time
        done = {r["model"] for r in records}
        old = [r for r in json.loads(out.read_text()) if r["model"] not in done]
        names = torchvision.models.list_models(module=torchvision.models)
        records = sorted(old + records, key=lambda r: names.index(r["model"]) if r["model"] in names else 999)
    out.write_text(json.dumps(records, indent=1, default=str))
    write_markdown(records, out.with_suffix(".md"))


def write_markdown(records, path: Path):
    from collections import Counter
    counts = Counter(r["outcome"] for r in records)
    half = sum(1 for r in records if r.get("dynamic_fraction", 0) >= 0.5 and r["outcome"] == "exact")
    with_bn = [r for r in records if r.get("batchnorms")]
    fold_ok = [r for r in with_bn if r.get("fold_rel_error") is not None and r["fold_rel_error"] <= 1e-4]
    tp_ok = sum(1 for r in records if r.get("tp_outcome") == "pruned")
    checked = [r for r in records if "shapes_match_real" in r]
    fast = sum(1 for r in checked if r["shape_propagation"] == "shapes only")
    lines = [f"{len(records)} models: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) +
             f"; exact with ≥ 50 % of MACs dynamic: {half}; Torch-Pruning pruned 50 %: {tp_ok}", "",
             f"Shape propagation: shapes-only run on {fast} of {len(checked)} checked models; same shapes, dtypes "
             f"and MACs as the real run on {sum(r['shapes_match_real'] for r in checked)} of {len(checked)}.", "",
             f"BatchNorm folded at export (`fold_batchnorm=True`, against the gated model, 1e-4 relative): exact on "
             f"{len(fold_ok)} of {len(with_bn)} models with BatchNorm; "
             f"{sum(r.get('batchnorms_folded', 0) for r in with_bn)} of {sum(r['batchnorms'] for r in with_bn)} "
             "BatchNorms folded (the rest are pairs `dcopt.fold` leaves alone, or follow no convolution or Linear).", "",
             "| model | outcome | dynamic MACs | MACs before → after | analyze / convert / export (s) | "
             "BN folded | Torch-Pruning | TP graph (s) | note |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        macs = f"{r.get('macs', 0) / 1e9:.2f}G → {r.get('macs_after', 0) / 1e9:.2f}G" if r.get("macs_after") else "-"
        times = "/".join(f"{r[k]:.2f}" for k in ("t_analyze", "t_convert", "t_export") if k in r) or "-"
        note = r.get("detail") or "; ".join(r.get("reasons", [])[:1]) or "; ".join(r.get("unsupported", [])[:1])
        bn = f"{r['batchnorms_folded']} of {r['batchnorms']}" if "batchnorms" in r else "-"
        lines.append(f"| {r['model']} | {r['outcome']} | {r.get('dynamic_fraction', 0):.0%} | {macs} | {times} | "
                     f"{bn} | {str(r.get('tp_outcome', '-'))[:40]} | {r.get('tp_t_graph', float('nan')):.2f} | "
                     f"{note[:90]} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
