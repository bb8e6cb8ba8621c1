"""How long the spine takes (issue 7: resnet50 under 2 s; dependency analysis no slower
than Torch-Pruning's). Run by hand on a quiet machine; results to
benchmarks/results/analyze_speed.{json,md}.

    .venv/bin/python benchmarks/analyze_speed.py

``dcopt.analyze`` and Torch-Pruning's ``DependencyGraph().build_dependency`` (both trace
the model, run it once on the example input and build their graph) are timed
interleaved, A B A B … (15 rounds), so background load hits both alike; the ratio is the
median of the per-round ratios. Garbage is collected before every timed call (untimed), so
neither pays for the cycles the other left behind.
``convert`` includes its own analysis, so what a user pays is convert + export.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torchvision

import dcopt

OUT = Path(__file__).parent / "results"


def timed(fn, repeats=5):
    times = []
    result = None
    for _ in range(repeats):
        gc.collect()
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def tp_graph(model, x):
    import torch_pruning as tp

    return tp.DependencyGraph().build_dependency(model, example_inputs=x)


def interleaved(a, b, repeats=15):
    """Medians of a and b timed alternately, and the median of the per-round ratios a/b
    (paired: a round's two timings share its background load). b: None when
    Torch-Pruning is not installed."""
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        b = None
    ta, tb = [], []
    for _ in range(repeats):
        for fn, acc in ((a, ta), (b, tb)):
            if fn is None:
                continue
            gc.collect()   # each call pays for its own garbage, not for the other's cycles
            t = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t)
    if not tb:
        return statistics.median(ta), None, None
    return statistics.median(ta), statistics.median(tb), statistics.median(x / y for x, y in zip(ta, tb))


def measure(name: str) -> dict:
    model = getattr(torchvision.models, name)(weights=None).eval()
    x = (torch.randn(1, 3, 224, 224),)
    dcopt.analyze(model, x)  # warm-up (imports, allocator)
    t_an, a = timed(lambda: dcopt.analyze(model, x))
    t_cv, dm = timed(lambda: dcopt.convert(model, x), 3)
    t_ex, _ = timed(lambda: dcopt.export(dm), 3)
    t_an, t_tp, ratio = interleaved(lambda: dcopt.analyze(model, x), lambda: tp_graph(model, x))
    return dict(model=name, threads=torch.get_num_threads(), analyze_s=round(t_an, 3), convert_s=round(t_cv, 3),
                export_s=round(t_ex, 3), total_s=round(t_an + t_cv + t_ex, 3), pipeline_s=round(t_cv + t_ex, 3),
                tp_graph_s=round(t_tp, 3) if t_tp else None,
                analyze_over_tp=round(ratio, 3) if ratio else None, groups=len(a.groups),
                dynamic_fraction=round(a.dynamic_fraction, 4))


def main(argv=None):
    """Every model at torch's default thread count, then at one thread (where the
    forward pass both tools run dominates more)."""
    import os

    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)  # --help, and no stray args

    torch.manual_seed(0)
    rows = []
    for threads in (torch.get_num_threads(), 1):
        torch.set_num_threads(threads)
        for name in ("resnet18", "resnet50", "mobilenet_v2", "densenet121"):
            rows.append(measure(name))
            print(rows[-1])
    OUT.mkdir(exist_ok=True)
    meta = dict(torch=torch.__version__, python=platform.python_version(), cpus=os.cpu_count(),
                loadavg_after=os.getloadavg())
    (OUT / "analyze_speed.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    lines = ["| model | threads | analyze (s) | convert (s) | export (s) | convert + export (s) | "
             "Torch-Pruning graph (s) | analyze / TP graph | groups | dynamic MACs |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['threads']} | {r['analyze_s']} | {r['convert_s']} | {r['export_s']} | "
              f"{r['pipeline_s']} | {r['tp_graph_s']} | {r['analyze_over_tp']} | {r['groups']} | "
              f"{r['dynamic_fraction']:.1%} |" for r in rows]
    lines += ["", f"torch {meta['torch']}, Python {meta['python']}, {meta['cpus']} CPUs; load average after: "
              f"{', '.join(f'{v:.2f}' for v in meta['loadavg_after'])}. analyze / TP graph: median of 15 "
              "interleaved per-round ratios."]
    (OUT / "analyze_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
