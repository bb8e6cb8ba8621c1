"""Does the noise see what removing an RNN hidden unit costs? (README, "RNN hidden units")

On the trained VAD CRNN (``benchmarks/vad.py``'s converged seed-0 model, the start of its
issue-9 study), for each GRU hidden unit m:

* **true**: the val loss with m units kept minus that with m + 1 (eval mode, the exact
  mask: what removing unit m really costs);
* **noise**: the val loss with unit m's share λ ≈ 0 (s = m + 0.01: unit m is all noise,
  units above it removed) minus that with m + 1 units, averaged over ``draws`` noise
  draws; once with the noise on the GRU's output only (``rnn_noise=False``) and once with
  the per-step recurrent noise too (``rnn_noise=True``, the default).

The pull on κ is the slope of that expected loss in λ, so a noise whose loss at λ ≈ 0
rises less than the true loss underestimates the unit's value. The second table is the
task gradient d(loss)/dκ itself at s = m + 0.5 on training batches of 16: its mean (the
pull) and its spread over batches and draws (Adam moves κ by about mean / RMS per step).

    python -m benchmarks.rnn_pull           # about 6 minutes on one thread
    python -m benchmarks.rnn_pull --tiny    # seconds: a tiny CRNN trained for one epoch

Writes ``results/rnn_pull.json``, ``rnn_pull.md`` and ``rnn_pull.png``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dcopt  # noqa: E402
from dcopt.gates import FeatureGate, GatedRNN  # noqa: E402
from benchmarks import vad  # noqa: E402
from benchmarks.common import json_safe  # noqa: E402

OUT = Path(__file__).parent / "results"
SCHEMES = {"output only": False, "output + recurrence": True}


def gru_group(dm) -> tuple[torch.Tensor, int]:
    """The GRU hidden size's κ and full width."""
    (i,) = [i for i, g in enumerate(dm.plan.groups) if g.name == "gru"]
    return list(dm.size_parameters())[i], dm.plan.groups[i].width


def set_mode(dm, noisy: bool, rnn_noise: bool) -> None:
    """Everything in eval mode (BatchNorm statistics fixed); the gates in train mode with
    their noise on when ``noisy``."""
    dm.eval()
    for m in dm.modules():
        if isinstance(m, (FeatureGate, GatedRNN)):
            m.train(noisy)
        if isinstance(m, GatedRNN):
            m.noise = noisy and rnn_noise


@torch.no_grad()
def val_loss(dm, x, y, chunk: int = 50) -> float:
    """Not ``vad.logits_of``: that puts the whole model in eval mode, gates included."""
    return float(vad.bce(torch.cat([dm(x[i:i + chunk]) for i in range(0, len(x), chunk)]), y))


def loss_rises(dm, val: dict, units: list[int], draws: int) -> list[dict]:
    kappa, H = gru_group(dm)
    rows = []
    for m in units:
        def at(s, noisy=False, rnn_noise=False, n=1):
            set_mode(dm, noisy, rnn_noise)
            with torch.no_grad():
                kappa.fill_(s / H)
            out = 0.0
            for d in range(n):
                torch.manual_seed(100 + d)
                out += val_loss(dm, val["x"], val["y"])
            return out / n
        kept = at(m + 1)
        row = dict(unit=m, true=at(m) - kept)
        for name, rnn_noise in SCHEMES.items():
            at(m + 0.01, True, rnn_noise)                  # the recurrent noise's σ for this unit
            row[name] = at(m + 0.01, True, rnn_noise, draws) - kept
        rows.append(row)
        print(f"unit {m}: " + ", ".join(f"{k} {v:+.5f}" for k, v in row.items() if k != "unit"), flush=True)
    return rows


def pulls(dm, train: dict, units: list[int], batches: int, batch: int) -> list[dict]:
    kappa, H = gru_group(dm)
    rows = []
    for m in units:
        row = dict(unit=m)
        for name, rnn_noise in SCHEMES.items():
            set_mode(dm, True, rnn_noise)
            with torch.no_grad():
                kappa.fill_((m + 0.5) / H)
            g = []
            for d in range(batches + 1):                    # the first sets σ
                torch.manual_seed(d)
                idx = torch.randperm(len(train["x"]))[:batch]
                kappa.grad = None
                vad.bce(dm(train["x"][idx]), train["y"][idx]).backward()
                g.append(float(kappa.grad))
            g = torch.tensor(g[1:])
            row[name] = dict(mean=float(g.mean()), std=float(g.std()))
        rows.append(row)
    return rows


def markdown(res: dict) -> str:
    names = list(SCHEMES)
    rises = res["loss_rises"]
    total = sum(r["true"] for r in rises)
    lines = ["# RNN hidden units: the noise's loss rise against removing the unit (VAD CRNN, GRU 64)", "",
             f"Model: `benchmarks/vad.py`'s converged seed-{res['seed']} full model; val split "
             f"({res['n_val']} clips); {res['draws']} noise draws per point; {res['seconds']:.0f} s.", "",
             "| units | true rise (sum) | " + " | ".join(f"{n} (sum, ÷ true)" for n in names)
             + " | " + " | ".join(f"{n}: mean abs error per unit" for n in names) + " |",
             "|---" * (2 + 2 * len(names)) + "|"]
    H = res["hidden"]
    for lo, hi in ((min(r["unit"] for r in rises), H // 2 - 1), (H // 2, H - 1), (min(r["unit"] for r in rises), H - 1)):
        sel = [r for r in rises if lo <= r["unit"] <= hi]
        if not sel:
            continue
        t = sum(r["true"] for r in sel)
        lines.append(f"| {lo}–{hi} | {t:.4f} | " + " | ".join(
            f"{sum(r[n] for r in sel):.4f} ({sum(r[n] for r in sel) / t:.2f})" for n in names) + " | " + " | ".join(
            f"{sum(abs(r[n] - r['true']) for r in sel) / len(sel):.5f}" for n in names) + " |")
    lines += ["", "Rise = val BCE with unit m removed (true) or all noise (λ ≈ 0), minus with m + 1 units kept.", "",
              "## The task's pull on the GRU's κ (d loss / dκ at s = m + 0.5, training batches)", "",
              "| unit m | " + " | ".join(f"{n}: mean ± std" for n in names) + " |", "|---" * (1 + len(names)) + "|"]
    for r in res["pulls"]:
        lines.append(f"| {r['unit']} | " + " | ".join(f"{r[n]['mean']:.4f} ± {r[n]['std']:.4f}" for n in names) + " |")
    lines += ["", f"{res['batches']} batches of {res['batch']} clips, one noise draw each. Total true rise over "
              f"units {min(r['unit'] for r in rises)}–{H - 1}: {total:.4f}.", ""]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rises = res["loss_rises"]
    u = [r["unit"] for r in rises]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(u, [r["true"] for r in rises], "k-o", ms=3, label="true (unit removed)")
    for name, style in zip(SCHEMES, ("C1--s", "C0-^")):
        ax.plot(u, [r[name] for r in rises], style, ms=3, label=f"noise: {name}")
    ax.axhline(0, color="0.7", lw=0.5)
    ax.set_xlabel("GRU unit m")
    ax.set_ylabel("val BCE rise")
    ax.set_title("What unit m is worth, and what the noise sees")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="seconds-long smoke run (a tiny CRNN, one epoch)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--draws", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    p = dict(vad.TINY if args.tiny else vad.FULL)
    # the data and the converged model of vad.py's config; its results files are never written
    # (tiny: a tiny run of its own under --out)
    state = args.out if args.tiny else vad.sd.DEFAULT_CACHE_DIR
    bench = vad.Bench(p, args.out / "vad-tiny" if args.tiny else args.out, args.tiny, state, args.threads)
    if args.tiny:
        model = bench.converged_model()
    else:
        path = bench.converged_checkpoint()
        if not path.exists():
            ap.error(f"{path} is missing: run benchmarks/vad.py first (its conv-* study caches the converged model)")
        model = vad.build(p)
        model.load_state_dict(torch.load(path, weights_only=True))
    dm = dcopt.convert(model, bench.example)
    dm.optimize_sizes()
    H = gru_group(dm)[1]
    units = list(range(1, H)) if args.tiny else list(range(8, H))
    pull_units = [H // 4, 7 * H // 16, 5 * H // 8, 7 * H // 8]
    res = dict(seed=p["seed"], hidden=H, n_val=len(bench.data["val"]["x"]), draws=args.draws, tiny=args.tiny,
               batches=23, batch=p["batch"])
    res["loss_rises"] = loss_rises(dm, bench.data["val"], units, args.draws)
    res["pulls"] = pulls(dm, bench.data["train"], pull_units, res["batches"], res["batch"])
    res["seconds"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rnn_pull.json").write_text(json.dumps(json_safe(res), indent=1) + "\n")
    (args.out / "rnn_pull.md").write_text(markdown(res))
    plot(res, args.out / "rnn_pull.png")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
