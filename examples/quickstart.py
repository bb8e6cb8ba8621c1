"""dcopt quickstart: learn a layer width, export the smaller model, load it without dcopt.

The task is made here, no download: random non-negative "power spectra" (257 FFT bins)
→ their 32-band triangular mel filter bank. That map is linear of rank 32, so the model
below, Linear(257→64) → Linear(64→32), is twice as wide as it needs to be; dcopt should
find a hidden width near 32 and keep the loss of the full model.

    python examples/quickstart.py                     # about a minute on a laptop CPU
    python examples/quickstart.py --epochs-scale 0.1  # a few seconds (CI smoke run)

Steps: convert → fit (fixed phase at full width, optimize phase with the size pressure,
settle phase with the sizes frozen) → export → before/after table → save_exported →
reload in a fresh Python that never imports dcopt and check the outputs match.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
from torch import nn

N_BINS, N_MELS, HIDDEN, SAMPLE_RATE = 257, 32, 64, 16000


# -- the task -------------------------------------------------------------------------------

def mel_filterbank(n_bins: int = N_BINS, n_mels: int = N_MELS, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """(n_mels, n_bins) triangular filters, equally spaced on the HTK mel scale, peak 1."""
    def hz_to_mel(f):
        return 2595.0 * math.log10(1.0 + f / 700.0)

    def mel_to_hz(m):
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    freqs = torch.linspace(0.0, sample_rate / 2, n_bins, dtype=torch.float64)
    mels = torch.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2), n_mels + 2, dtype=torch.float64)
    edges = torch.tensor([mel_to_hz(float(m)) for m in mels], dtype=torch.float64)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None] - lo) / (mid - lo)
    down = (hi - freqs[None]) / (hi - mid)
    return torch.clamp(torch.minimum(up, down), min=0.0).float()


def power_spectra(n: int, generator: torch.Generator) -> torch.Tensor:
    """Non-negative random spectra: two smooth random envelopes (a broad tilt and a
    formant-like one) multiplied, times periodogram-like noise (exponentially distributed
    per bin, as the power of a noisy signal is), plus a small noise floor."""
    f = torch.linspace(0.0, 1.0, N_BINS)
    k = torch.arange(1, 7, dtype=torch.float32)
    basis = torch.cos(math.pi * k[:, None] * f[None])                       # (6, bins): smooth shapes
    tilt = 0.5 * torch.randn(n, 6, generator=generator) / k                      # low orders dominate
    formants = 0.3 * torch.randn(n, 6, generator=generator)
    envelope = torch.exp(tilt @ basis) * torch.exp(formants @ basis)
    envelope = envelope * torch.exp(-2.0 * torch.rand(n, 1, generator=generator) * f)  # random roll-off
    jitter = -torch.log(torch.rand(n, N_BINS, generator=generator).clamp(min=1e-12))  # Exp(1)
    floor = 0.02 * torch.rand(n, N_BINS, generator=generator)
    return envelope * jitter + floor


def make_data(n_train: int, n_test: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    fb = mel_filterbank()
    x_train, x_test = power_spectra(n_train, g), power_spectra(n_test, g)
    x_scale = float(x_train.mean())                  # inputs of order 1
    x_train, x_test = x_train / x_scale, x_test / x_scale
    y_scale = float((x_train @ fb.T).std())          # targets of order 1
    return (x_train, x_train @ fb.T / y_scale), (x_test, x_test @ fb.T / y_scale)


def batches(x, y, batch_size):
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]


def l1(out, target):
    return (out - target).abs().mean()


@torch.no_grad()
def test_l1(model, data):
    model.eval()
    return sum(float(l1(model(x), y)) * len(x) for x, y in data) / sum(len(x) for x, _ in data)


# -- the run --------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs-scale", type=float, default=1.0,
                        help="multiply every phase's epochs (0.1 for a quick smoke run)")
    parser.add_argument("--beta", type=float, default=4.0, help="strength of the L2 size pressure")
    parser.add_argument("--out", default="out/quickstart", help="folder for the saved small model")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar and no per-epoch lines (the results are still printed)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import dcopt
    from dcopt.train import fit
    from rich.console import Console
    from rich.table import Table

    console = Console()
    torch.manual_seed(args.seed)
    if os.cpu_count() and os.cpu_count() <= 4:
        torch.set_num_threads(1)  # a model this small is faster on one thread

    (x_train, y_train), (x_test, y_test) = make_data(4096, 1024, seed=args.seed)
    train, test = batches(x_train, y_train, 64), batches(x_test, y_test, 512)

    model = nn.Sequential(nn.Linear(N_BINS, HIDDEN), nn.Linear(HIDDEN, N_MELS))
    example = (x_train[:8],)
    dm = dcopt.convert(model, example, regularizer="l2", beta=args.beta, kappa_min=0.125)

    def epochs(n):
        return max(1, round(n * args.epochs_scale))

    fixed, optimize, settle = epochs(10), epochs(40), epochs(10)
    reference = copy.deepcopy(dm)  # same initial weights, trained at full width for comparison

    t0 = time.perf_counter()
    console.rule("dcopt: fixed → optimize → settle")
    # lr 3e-3 for the weights; the sizes keep fit's default size_lr=3e-4, 10x slower, so
    # the weights can re-adapt while a size shrinks (DESIGN.md, "Size dynamics").
    hist = fit(dm, train, l1, fixed_epochs=fixed, optimize_epochs=optimize, settle_epochs=settle, lr=3e-3,
               val_data=test, progress=not args.no_progress, log_every=5)
    seconds = time.perf_counter() - t0
    console.rule("reference: the full-width model, same epochs, fixed phase only")
    fit(reference, train, l1, fixed_epochs=fixed + optimize + settle, optimize_epochs=0, lr=3e-3,
        val_data=test, progress=not args.no_progress, log_every=20)
    full = dcopt.export(reference)                  # every group at full width: the plain original

    small = dcopt.export(dm)                        # plain PyTorch, checked against the gated model
    one = (x_test[:1],)
    table = Table(title="dcopt quickstart", caption=f"{seconds:.0f} s to train the small model")
    for col in ("", "full", "exported"):
        table.add_column(col, justify="right" if col else "left")
    for name, info in dm.sizes().items():
        table.add_row(f"width of group {name!r}", str(info.width), str(info.kept))
    macs_full, macs_small = dcopt.count_macs(full, one), dcopt.count_macs(small, one)
    table.add_row("MACs per spectrum", f"{macs_full:,}", f"{macs_small:,} ({macs_small / macs_full:.0%})")
    p_full, p_small = (sum(p.numel() for p in m.parameters()) for m in (full, small))
    table.add_row("parameters", f"{p_full:,}", f"{p_small:,} ({p_small / p_full:.0%})")
    table.add_row("test L1 loss", f"{test_l1(full, test):.4f}", f"{test_l1(small, test):.4f}")
    console.print(table)
    console.print(f"final β {hist.last.beta:g}, κ {', '.join(f'{k:.3f}' for k in hist.last.kappa.values())}")

    if not hasattr(dcopt, "save_exported"):
        console.print("[yellow]this dcopt has no save_exported yet; skipping save and reload[/]")
        return 0
    folder = Path(dcopt.save_exported(small, args.out, example_inputs=(x_test[:4],))).resolve()
    with torch.no_grad():
        expected = small.eval()(x_test[:16])
    torch.save({"x": x_test[:16], "y": expected}, folder / "check.pt")
    console.print(f"saved to {folder}/ ({', '.join(sorted(p.name for p in folder.iterdir()))})")

    # A fresh interpreter that never imports dcopt: the folder's own __init__.py has load().
    reload = textwrap.dedent(f"""
        import importlib.util, sys, torch
        spec = importlib.util.spec_from_file_location("quickstart_small", {str(folder / '__init__.py')!r})
        mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
        model = mod.load()
        check = torch.load({str(folder / 'check.pt')!r}, weights_only=True)
        err = (model(check["x"]) - check["y"]).abs().max().item()
        assert "dcopt" not in sys.modules, "dcopt was imported"
        print(f"reloaded without dcopt: {{type(model).__name__}}, max abs difference {{err:.2e}}")
        sys.exit(0 if err <= 1e-6 else 1)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", reload], capture_output=True, text=True, env=env,
                          cwd=str(folder.parent))
    console.print(proc.stdout.strip() or proc.stderr.strip())
    if proc.returncode != 0:
        console.print("[bold red]the reloaded model does not match[/]")
        return 1
    console.print("[bold green]outputs match[/]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
