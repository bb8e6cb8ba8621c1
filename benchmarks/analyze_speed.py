"""How long the spine takes on resnet50 (run by hand; results to benchmarks/results/analyze_speed.{json,md}).

    .venv/bin/python benchmarks/analyze_speed.py
"""
from __future__ import annotations

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
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def main():
    torch.manual_seed(0)
    rows = []
    for name in ("resnet18", "resnet50", "mobilenet_v2"):
        model = getattr(torchvision.models, name)(weights=None).eval()
        x = (torch.randn(1, 3, 224, 224),)
        dcopt.analyze(model, x)  # warm-up (imports, allocator)
        t_an, a = timed(lambda: dcopt.analyze(model, x))
        t_cv, dm = timed(lambda: dcopt.convert(model, x), 3)
        t_ex, _ = timed(lambda: dcopt.export(dm), 3)
        rows.append(dict(model=name, analyze_s=round(t_an, 3), convert_s=round(t_cv, 3), export_s=round(t_ex, 3),
                         total_s=round(t_an + t_cv + t_ex, 3), groups=len(a.groups),
                         dynamic_fraction=round(a.dynamic_fraction, 4)))
        print(rows[-1])
    OUT.mkdir(exist_ok=True)
    meta = dict(torch=torch.__version__, python=platform.python_version(), threads=torch.get_num_threads())
    (OUT / "analyze_speed.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    lines = ["| model | analyze (s) | convert (s) | export (s) | groups | dynamic MACs |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['analyze_s']} | {r['convert_s']} | {r['export_s']} | {r['groups']} | "
              f"{r['dynamic_fraction']:.1%} |" for r in rows]
    (OUT / "analyze_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
