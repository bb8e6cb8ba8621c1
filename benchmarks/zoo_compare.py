"""Compare two zoo runs (benchmarks/zoo.py JSON) column by column, timings aside.

Why: the full zoo (80 models, with Torch-Pruning) wants a quiet machine for half an hour;
after a change to the analysis or the export, re-running the smaller models without
Torch-Pruning and comparing every outcome column with the committed ``zoo.json`` says
whether the change moved any result. Writes a short markdown summary.

    .venv/bin/python benchmarks/zoo.py --skip-largest --no-torch-pruning \\
        --out benchmarks/results/zoo-recheck.json
    .venv/bin/python benchmarks/zoo_compare.py benchmarks/results/zoo.json \\
        benchmarks/results/zoo-recheck.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

#: what a model's run decided and measured (not how long it took)
COLUMNS = ("outcome", "dynamic_fraction", "groups", "dynamic_groups", "macs", "macs_after", "macs_predicted",
           "batchnorms", "batchnorms_folded", "shape_propagation", "shapes_match_real")


def compare(old: list[dict], new: list[dict]) -> tuple[list[str], dict[str, list[tuple]]]:
    """(models in both, {model: [(column, old, new), ...]} for those that differ)."""
    before = {r["model"]: r for r in old}
    common = [r["model"] for r in new if r["model"] in before]
    diffs = {}
    for r in new:
        o = before.get(r["model"])
        if o is None:
            continue
        d = [(c, o.get(c), r.get(c)) for c in COLUMNS if o.get(c) != r.get(c)]
        if d:
            diffs[r["model"]] = d
    return common, diffs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="markdown summary (default: NEW with -compare.md)")
    args = ap.parse_args(argv)
    old, new = json.loads(args.old.read_text()), json.loads(args.new.read_text())
    common, diffs = compare(old, new)
    exact = sum(r.get("outcome") == "exact" for r in new)
    lines = [f"# {args.new.name} against {args.old.name}", "",
             f"{len(new)} models in {args.new.name}, {exact} exact; {len(common)} also in {args.old.name}; "
             f"{len(common) - len(diffs)} of them identical in every column compared "
             f"({', '.join(COLUMNS)}; timings are not compared).", ""]
    for model, d in sorted(diffs.items()):
        lines.append(f"* {model}: " + "; ".join(f"{c} {a!r} → {b!r}" for c, a, b in d))
    text = "\n".join(lines) + "\n"
    out = args.out or args.new.with_name(args.new.stem + "-compare.md")
    out.write_text(text)
    print(text)
    return 0 if not diffs else 1


if __name__ == "__main__":
    raise SystemExit(main())
