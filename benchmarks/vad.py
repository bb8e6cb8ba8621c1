"""Voice activity detection with a CRNN (GitHub issue 6, section 2; issue 9's VAD item).

Model (:class:`CRNN`), on the 257-bin power spectrogram ``[B, 257, T]`` (10 ms frames):

* a learnable filter bank ``Linear(257 → 80, no bias)`` applied per frame, initialised to
  80 triangular bands on the mel centres in :func:`dcopt.spread_order`, band j reaching
  :func:`dcopt.spread_reach` centres to each side (:func:`speech_data.nested_mel_filterbank`,
  ``band_order="nested"``). dcopt keeps the *first* bands of the group: in frequency order
  those are the lowest (a 25 % budget kept 0–1.2 kHz); in spread order
  (``band_order="spread"``, 80 narrow mel bands) they span the spectrum but leave gaps
  between them (24 of 80 see 127 of the 257 bins), and at the 15 % budget dcopt lost
  0.6 pp val EER to the static baseline over 3 seeds — about what a static model of the
  same widths loses when initialised with those 24 narrow bands instead of 24 wide ones
  (one-off, 3 seeds: +0.7 pp). Nested bands cover the spectrum at every prefix. Every
  model starts from this bank at its own band count, the baselines trained from scratch
  (``static-*``, ``alloc-*``) too. Then ``log(|·| + eps)``
  (``abs`` keeps the log defined once training makes a weight negative) and a
  BatchNorm1d — the band count is a dynamic group, as in the paper;
* two Conv1d blocks (kernel 5 and 3) with BatchNorm + ReLU (their channels: two groups);
* a GRU (hidden size: a group), batch first;
* ``Linear(hidden → 1)`` per frame → a speech logit per frame.

``dcopt.analyze`` finds 4 dynamic groups (fb 80, convs.0 64, convs.3 64, gru 64) covering
100 % of the MACs and no rejection; the log, the transposes and BatchNorm are per-channel
ops the gates sit after. The full model is deliberately wider than the task needs.

Data: ``speech_data.make_vad_dataset(split, features="power")`` — 3 s clips of espeak-ng
speech in noise (SNR −5..25 dB, 15 % clean at 25..40 dB), split by voice; the first
``n_train`` of the 1000 training clips are used. Frame labels from the clean speech.

Metric: frame-level **EER** (:func:`speech_common.eer`) on the test split overall and by
SNR band, the band of a frame being that of its **clip SNR** (``snr``, speech-frame SNR of
the clip): a per-frame SNR is −60 dB on every non-speech frame, so per-frame bands would
have no negatives above 5 dB and no EER. Complexity: **MACs per second of audio** (one
clip of 100 frames, :func:`speech_common.count_macs`) and parameters.

Schedule (same data order, seeds and total epochs for every run): one shared *fixed*
phase (``fixed`` epochs at full width), then per run ``optimize`` + ``settle`` epochs from
that checkpoint with a fresh Adam:

* ``full``: the full model keeps training (fit with sizes fixed), settle at ``settle_lr``;
* ``kappa-0.5/0.25/0.125``: dcopt, the paper's L2 regularizer, β fixed, κ_min as named;
* ``budget-0.5/0.25/0.15``: dcopt budget mode (``target_macs``);
* ``tol-1%/5%``: dcopt tolerance mode (``fit(..., tolerance=...)``, MACs regularizer,
  reference = val loss at the end of the shared fixed phase, as fit measures it). That
  phase is short and its val loss far from converged (and noisy at lr 2e-3), so the bound
  never binds: these runs show what an unconverged reference does;
* ``static-<run>``: the CRNN with every width scaled uniformly (``static_scaled``) to the
  MACs of that dcopt run's exported model, trained from scratch for all the epochs;
* ``tp-<run>``: the fixed-phase model pruned by Torch-Pruning (magnitude) to the same
  MACs, fine-tuned for optimize + settle epochs (what it could not prune is recorded);
* ``alloc-budget-*``: the widths dcopt exported for that budget run, trained from scratch
  exactly like ``static-*``: separates what dcopt's widths are worth from its training
  path.

Issue 9's study (``conv-*``) starts from a *converged* full model, the ``full`` run's final
weights (saved as a checkpoint), and trains every run for the same ``CONV`` schedule at a
lower lr, where the val loss moves by about 2 % from epoch to epoch instead of 20 %:

* ``conv-full``: the full model keeps training (the reference point for Δ);
* ``conv-tol-1%/5%``: tolerance mode; the reference is the mean val loss of the shared
  phase's last 3 epochs, as fit takes it from a fixed phase in the same call (with one
  evaluation of the checkpoint, fit's reference without a fixed phase, seed 1's two
  tolerances came out in the wrong order);
* ``conv-budget-1%/5%``: budget mode with the target set to the MACs the tolerance run
  with that tolerance reached: "at least as good as budget mode at the same MACs".

Every dcopt run is exported with ``dcopt.export`` (which checks it equals the eval-mode
DynamicModel on the example inputs); the EER is measured on the exported model, and its
output is compared with the DynamicModel's on test clips too (``export_max_abs_diff``).

Run::

    .venv/bin/python benchmarks/vad.py                   # everything (1 thread), ~1 h
    .venv/bin/python benchmarks/vad.py --resume          # skip runs already in vad.json
    .venv/bin/python benchmarks/vad.py --only budget-0.15 --resume
    .venv/bin/python benchmarks/vad.py --tiny --out /tmp/vad   # seconds (tests)

Results are written after every run to ``--out`` (default benchmarks/results):
``vad.json``, ``vad.md``, ``vad.png``.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dcopt  # noqa: E402
from benchmarks import speech_common as sc  # noqa: E402
from benchmarks import speech_data as sd  # noqa: E402
from dcopt.tolerance import ToleranceController  # noqa: E402

OUT = Path(__file__).parent / "results"
NAME = "vad"

FULL = dict(n_train=600, n_val=200, n_test=400, batch=16, fixed=6, optimize=10, settle=4,
            lr=2e-3, settle_lr=2e-4, size_lr=1e-2, beta=1.0, regularizer="l2", cross_epochs=4.0,
            bands=80, channels=[64, 64], hidden=64, tp_steps=100, seed=0, band_order="nested",
            rnn_noise=True)
TINY = dict(n_train=8, n_val=8, n_test=8, batch=4, fixed=1, optimize=1, settle=0,
            lr=2e-3, settle_lr=2e-4, size_lr=1e-2, beta=1.0, regularizer="l2", cross_epochs=1.0,
            bands=12, channels=[8, 8], hidden=8, tp_steps=10, seed=0, frames=100, band_order="nested",
            rnn_noise=True)

#: issue 9's study: every conv-* run continues the converged full model for this schedule
CONV_FULL = dict(fixed=8, optimize=24, settle=4, lr=5e-4, cross_epochs=8.0, rate=0.3)
CONV_TINY = dict(fixed=1, optimize=1, settle=1, lr=5e-4, cross_epochs=1.0, rate=0.3)

KAPPAS = (0.5, 0.25, 0.125)
BUDGETS = (0.5, 0.25, 0.15)
TOLERANCES = (0.01, 0.05)
DCOPT_RUNS = ([f"kappa-{k:g}" for k in KAPPAS] + [f"budget-{b:g}" for b in BUDGETS]
              + [f"tol-{100 * t:g}%" for t in TOLERANCES])
CONV_RUNS = (["conv-full"] + [f"conv-tol-{100 * t:g}%" for t in TOLERANCES]
             + [f"conv-budget-{100 * t:g}%" for t in TOLERANCES])
#: static with dcopt's widths: does dcopt lose to static through its widths or its training path?
ALLOC_RUNS = [f"alloc-{r}" for r in DCOPT_RUNS if r.startswith("budget-")]
ALL_RUNS = (["full"] + DCOPT_RUNS + [f"static-{r}" for r in DCOPT_RUNS] + [f"tp-{r}" for r in DCOPT_RUNS]
            + CONV_RUNS + ALLOC_RUNS)

TARGET_MACS_CUT = 0.80      # issue 6: ≥ 80 % fewer MACs ...
TARGET_EER_PP = 1.5         # ... with at most +1.5 pp EER


# -- model --------------------------------------------------------------------------------

class CRNN(nn.Module):
    """Learnable filter bank → log → BN → Conv1d blocks (BN + ReLU) → GRU → Linear per frame."""

    def __init__(self, bands: int = 80, channels=(64, 64), hidden: int = 64, kernel: int = 5, eps: float = 1e-6,
                 mel_init: bool = True, band_order: str = "frequency"):
        super().__init__()
        self.eps = eps
        self.fb = nn.Linear(sd.N_BINS, bands, bias=False)
        if mel_init:
            mel = sd.mel_filterbank(bands)
            if band_order == "spread":   # every prefix of the bands spans the spectrum (dcopt.spread_order)
                mel = mel[dcopt.spread_order(bands)]
            elif band_order == "nested":  # ... and covers it (dcopt.spread_reach)
                mel = sd.nested_mel_filterbank(bands)
            elif band_order != "frequency":
                raise ValueError(f"band_order must be 'frequency', 'spread' or 'nested', got {band_order!r}")
            with torch.no_grad():
                self.fb.weight.copy_(mel)
        self.norm0 = nn.BatchNorm1d(bands)
        layers, c_in = [], bands
        for i, c in enumerate(channels):
            k = kernel if i == 0 else 3
            layers += [nn.Conv1d(c_in, c, k, padding=k // 2), nn.BatchNorm1d(c), nn.ReLU()]
            c_in = c
        self.convs = nn.Sequential(*layers)
        self.gru = nn.GRU(c_in, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, power: torch.Tensor) -> torch.Tensor:   # [B, 257, T] → logits [B, T]
        x = self.fb(power.transpose(1, 2))                      # [B, T, bands]
        x = torch.log(x.abs() + self.eps).transpose(1, 2)       # [B, bands, T]
        x = self.convs(self.norm0(x))
        y, _ = self.gru(x.transpose(1, 2))
        return self.head(y).squeeze(-1)


def build(p: dict, mult: float = 1.0) -> CRNN:
    """The CRNN of config ``p`` with every (dynamic) width scaled by ``mult``; its filter
    bank initialised the same way at every band count, the baselines trained from scratch
    too: the stronger baseline (the static runs' val EER with the nested bank was at or
    below that with the uniform mel bank of the same band count at 15 of 16 runs; the
    uniform version is ``vad.json`` at commit 661a032)."""
    return CRNN(bands=sc.scaled_width(p["bands"], mult), channels=[sc.scaled_width(c, mult) for c in p["channels"]],
                hidden=sc.scaled_width(p["hidden"], mult), band_order=p["band_order"])


def bce(logits, labels):
    return F.binary_cross_entropy_with_logits(logits, labels)


# -- data ---------------------------------------------------------------------------------

class EpochBatches:
    """Re-iterable batches, a new permutation each epoch, seeded by (seed, epoch): every
    run that starts at the same epoch sees the same batches in the same order."""

    def __init__(self, x, y, batch: int, seed: int, start_epoch: int = 0):
        self.x, self.y, self.batch, self.seed, self.epoch = x, y, batch, seed, start_epoch

    def __len__(self):
        return math.ceil(len(self.x) / self.batch)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        self.epoch += 1
        perm = torch.randperm(len(self.x), generator=g)
        for i in range(0, len(perm), self.batch):
            idx = perm[i:i + self.batch]
            yield self.x[idx], self.y[idx]


def load_data(p: dict, tiny: bool) -> dict:
    out = {}
    for split, n in (("train", p["n_train"]), ("val", p["n_val"]), ("test", p["n_test"])):
        d = sd.make_vad_dataset(split, features="power", tiny=tiny)
        t = p.get("frames")  # tiny: the first second of each clip only
        out[split] = dict(x=d["features"][:n, :, :t].float().contiguous(), y=d["labels"][:n, :t].float().contiguous(),
                          snr=d["snr"][:n].float())
    return out


def chunks(x, y, size: int = 50):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


@torch.no_grad()
def logits_of(model, x, size: int = 50) -> torch.Tensor:
    was = model.training
    model.eval()
    try:
        return torch.cat([model(x[i:i + size]) for i in range(0, len(x), size)])
    finally:
        model.train(was)


def evaluate(model, split: dict) -> dict:
    """Frame EER overall and by clip-SNR band, and the BCE, on one split."""
    z = logits_of(model, split["x"])
    y = split["y"]
    band = sd.snr_band(split["snr"])[:, None].expand_as(y)
    by_band = {}
    for i, name in enumerate(sd.SNR_BAND_NAMES):
        m = band == i
        by_band[name] = sc.eer(z[m], y[m]) if m.any() else float("nan")
    return dict(eer=sc.eer(z, y), eer_by_band=by_band, bce=float(bce(z, y)),
                clips_by_band={n: int((sd.snr_band(split["snr"]) == i).sum()) for i, n in enumerate(sd.SNR_BAND_NAMES)})


# MACs are exactly linear in the number of frames ("same"-padded convs, per-frame Linear,
# GRU steps), and counting a GRU under FlopCounterMode is slow: count 10 frames, × 10.
MACS_FRAMES = 10
PER_SECOND = 100 // MACS_FRAMES


def macs_example() -> tuple:
    return (torch.rand(1, sd.N_BINS, MACS_FRAMES),)


def complexity(model, p: dict) -> tuple[int, int]:
    """(MACs per second of audio = 100 frames, parameters)."""
    return PER_SECOND * sc.count_macs(model, macs_example()), sum(t.numel() for t in model.parameters())


def widths_of(model: nn.Module) -> dict:
    return dict(fb=model.fb.out_features, convs=[m.out_channels for m in model.convs if isinstance(m, nn.Conv1d)],
                gru=model.gru.hidden_size, gru_input=model.gru.input_size)


def compact_history(hist) -> list[dict]:
    keep = ("phase", "epoch", "train_loss", "complexity_loss", "val_loss", "macs_fraction", "beta", "sizes",
            "constraint_loss", "loss_bound", "backtracked", "seconds")
    if isinstance(hist, dict):  # train_plain
        return [{k: r.get(k) for k in ("epoch", "lr", "train_loss", "val_loss", "seconds")} for r in hist["epochs"]]
    return [{k: getattr(r, k) for k in keep} for r in hist.epochs]


# -- the benchmark ------------------------------------------------------------------------

class Bench:
    def __init__(self, p: dict, out: Path, tiny: bool, state_dir: Path, threads: int):
        self.p, self.out, self.tiny, self.state_dir = p, out, tiny, state_dir
        self.conv = dict(CONV_TINY if tiny else CONV_FULL)
        self.data = load_data(p, tiny)
        self.records: list[dict] = []
        self.fixed_info: Optional[dict] = None
        self.conv_info: Optional[dict] = None     # the shared fixed phase of the conv-* runs
        self.t_start = time.perf_counter()
        self.threads = threads
        self.name = results_name(p)
        # the cached fixed, full and conv phases train no sizes: rnn_noise cannot change them
        self.shared_p = {k: v for k, v in p.items() if k != "rnn_noise"}
        # the cached phases are keyed by the training data too: the clips depend on the
        # espeak-ng voices installed, which the configuration does not name
        self.data_key = _data_key(self.data["train"])
        self.replicates: dict = {}
        tr = self.data["train"]
        self.example = (tr["x"][:2, :, :20].contiguous(),)   # shapes for dcopt; short: tracing a GRU is slow
        self.val = chunks(self.data["val"]["x"], self.data["val"]["y"])

    # -- persistence --
    def load(self) -> None:
        path = self.out / f"{self.name}.json"
        if path.exists():
            old = json.loads(path.read_text())
            if old.get("config", {}).get("p") == json.loads(json.dumps(self.p)):
                self.records = [r for r in old.get("records", []) if r["run"] in ALL_RUNS]
                self.fixed_info = old.get("fixed_phase")
                self.conv_info = old.get("conv_fixed_phase")
                if old["config"].get("conv") != json.loads(json.dumps(self.conv)):  # another conv-* schedule
                    self.records = [r for r in self.records if r["run"] not in CONV_RUNS]
                    self.conv_info = None
                self.replicates = old.get("replicates") or {}
            else:
                print("vad.json has another configuration: starting over", flush=True)

    def save(self, final: bool = True) -> None:
        cfg = dict(p=self.p, conv=self.conv, tiny=self.tiny, threads=self.threads, runs=ALL_RUNS,
                   data="speech_data.make_vad_dataset(split, features='power')" + (" tiny" if self.tiny else ""))
        sc.write_results(self.name, self.records, self.out, title(self.p, self.tiny), "EER", config=cfg,
                         notes=notes(self.records, self.p, self.fixed_info, self.tiny, self.replicates, self.conv,
                                     self.conv_info),
                         extra=dict(fixed_phase=self.fixed_info, conv_fixed_phase=self.conv_info,
                                    targets=targets(self.records),
                                    replicates=self.replicates),
                         plot=final or not self.tiny)

    def record(self, rec: dict) -> None:
        self.records = [r for r in self.records if r["run"] != rec["run"]] + [rec]
        order = {n: i for i, n in enumerate(ALL_RUNS)}
        self.records.sort(key=lambda r: order.get(r["run"], 999))
        self.save(final=False)
        print(f"{rec['run']:>22}: MACs/s {rec['macs'] / 1e6:.3f}M ({100 * rec['macs_fraction']:.1f}%), "
              f"test EER {100 * rec['metric']:.2f}%, val EER {100 * rec['val_eer']:.2f}%, {rec['seconds']:.0f} s",
              flush=True)

    def get(self, run: str) -> Optional[dict]:
        return next((r for r in self.records if r["run"] == run), None)

    # -- the shared fixed phase --
    def fixed_model(self) -> CRNN:
        path = self._fixed_path()
        model = build(self.p)
        if path.exists() and self.fixed_info is not None:
            model.load_state_dict(torch.load(path, weights_only=True))
            return model
        torch.manual_seed(self.p["seed"])
        model = build(self.p)
        dm = dcopt.convert(model, self.example)
        t0 = time.perf_counter()
        torch.manual_seed(self.p["seed"] + 1)
        hist = dcopt.fit(dm, self.train_batches(0), bce, fixed_epochs=self.p["fixed"], optimize_epochs=0,
                         settle_epochs=0, lr=self.p["lr"], val_data=self.val, progress=False)
        trained = dcopt.export(dm)
        self.fixed_info = dict(seconds=time.perf_counter() - t0, history=compact_history(hist),
                               val=evaluate(trained, self.data["val"]))
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(trained.state_dict(), path)
        print(f"fixed phase: {self.fixed_info['seconds']:.0f} s, val EER {100 * self.fixed_info['val']['eer']:.2f}%",
              flush=True)
        model.load_state_dict(trained.state_dict())
        return model

    def train_batches(self, start_epoch: int) -> EpochBatches:
        tr = self.data["train"]
        return EpochBatches(tr["x"], tr["y"], self.p["batch"], self.p["seed"], start_epoch)

    def finish(self, run: str, method: str, model: nn.Module, seconds: float, **extra) -> dict:
        macs, params = complexity(model, self.p)
        test = evaluate(model, self.data["test"])
        val = evaluate(model, self.data["val"])
        full = self.get("full")
        full_macs = full["macs"] if full else (macs if method == "full" else None)
        rec = dict(run=run, method=method, macs=macs, params=params, metric=test["eer"], val_eer=val["eer"],
                   val_bce=val["bce"],
                   eer_by_band=test["eer_by_band"], val_eer_by_band=val["eer_by_band"], test_bce=test["bce"],
                   clips_by_band=test["clips_by_band"],
                   macs_fraction=macs / full_macs if full_macs else float("nan"), widths=widths_of(model),
                   seconds=seconds, seconds_fixed_phase=self.fixed_info["seconds"] if self.fixed_info else None,
                   **extra)
        self.record(rec)
        return rec

    # -- runs --
    def run(self, name: str) -> None:
        p = self.p
        if name == "full":
            base = self.fixed_model()
            dm = dcopt.convert(base, self.example)
            t0 = time.perf_counter()
            torch.manual_seed(p["seed"] + 2)
            hist = dcopt.fit(dm, self.train_batches(p["fixed"]), bce, fixed_epochs=p["optimize"], optimize_epochs=0,
                             settle_epochs=p["settle"], lr=p["lr"], settle_lr=p["settle_lr"], progress=False)
            model = dcopt.export(dm)
            torch.save(model.state_dict(), self._converged_path())
            self.finish(name, "full", model, time.perf_counter() - t0, history=compact_history(hist))
        elif name in CONV_RUNS:
            self.run_conv(name)
        elif name in DCOPT_RUNS:
            self.run_dcopt(name)
        elif name.startswith("static-") or name in ALLOC_RUNS:
            self.run_static(name)
        elif name.startswith("tp-"):
            self.run_tp(name)
        else:
            raise ValueError(f"unknown run {name!r}; runs: {ALL_RUNS}")

    def run_dcopt(self, name: str) -> None:
        p = self.p
        base = self.fixed_model()
        kind, _, val = name.partition("-")
        fit_kw = dict(lr=p["lr"], settle_lr=p["settle_lr"], progress=False)
        if kind == "kappa":
            opts = dict(kappa_min=float(val), regularizer=p["regularizer"], beta=p["beta"])
            fit_kw.update(size_lr=p["size_lr"], settle_epochs=p["settle"])
        elif kind == "budget":
            opts = dict(kappa_min=0.05, target_macs=float(val), beta=p["beta"])
            fit_kw.update(size_lr=p["size_lr"], settle_epochs=p["settle"])
        else:  # tolerance mode
            opts = dict(kappa_min=0.05, regularizer="macs")
            fit_kw.update(tolerance=float(val.rstrip("%")) / 100, cross_epochs=p["cross_epochs"],
                          settle_epochs=p["settle"], val_data=self.val)
        method = {"kappa": "dcopt-kappa", "budget": "dcopt-budget", "tol": "dcopt-tolerance"}[kind]
        self.train_dcopt(name, method, base, opts, p["fixed"], p["optimize"], fit_kw)

    def train_dcopt(self, name: str, method: str, base: nn.Module, opts: dict, start_epoch: int,
                    optimize_epochs: int, fit_kw: dict) -> None:
        """convert → fit (optimize + settle) → export, checked and recorded."""
        p = self.p
        dm = dcopt.convert(base, self.example, rnn_noise=self.p["rnn_noise"], **opts)
        t0 = time.perf_counter()
        torch.manual_seed(p["seed"] + 2)
        hist = dcopt.fit(dm, self.train_batches(start_epoch), bce, fixed_epochs=0, optimize_epochs=optimize_epochs,
                         **fit_kw)
        seconds = time.perf_counter() - t0
        small = dcopt.export(dm)      # raises ExportError if it differs from dm.eval() on the example inputs
        xt = self.data["test"]["x"][:8]
        diff = float((logits_of(dm, xt) - logits_of(small, xt)).abs().max())
        report = dcopt.export_report(dm, small)
        self.finish(name, method, small, seconds, options=opts,
                    fit={k: (v if k != "tolerance" else getattr(v, "tolerance", v)) for k, v in fit_kw.items()
                         if k != "val_data"},
                    sizes={n: i.kept for n, i in dm.sizes().items()}, group_widths=hist.widths,
                    macs_fraction_dcopt=float(dm.complexity(at="kept").macs_fraction),
                    export_max_abs_diff=diff, export_report=_jsonable(report),
                    reference_loss=hist.reference_loss, history=compact_history(hist))

    def _fixed_path(self) -> Path:
        return self.state_dir / f"vad-fixed-{_key([self.shared_p, self.data_key], self.tiny)}.pt"

    # -- issue 9's study: from the converged full model --
    def _converged_path(self) -> Path:
        return self.state_dir / f"vad-full-{_key([self.shared_p, self.data_key], self.tiny)}.pt"

    def converged_checkpoint(self) -> Path:
        """Where :meth:`converged_model` caches its weights (named by the hash of the config and the training data)."""
        return self.state_dir / f"vad-conv-{_key([self.shared_p, self.data_key, self.conv], self.tiny)}.pt"

    def converged_model(self) -> CRNN:
        """The ``full`` run's final weights trained on for ``conv['fixed']`` epochs at the
        conv lr (shared by every conv-* run, cached): the full model converged under the
        learning rate the conv-* runs train with, so its val loss is a fair reference."""
        path = self.converged_checkpoint()
        model = build(self.p)
        if path.exists() and self.conv_info is not None:
            model.load_state_dict(torch.load(path, weights_only=True))
            return model
        if not self._converged_path().exists() or self.get("full") is None:
            self.run("full")
        model.load_state_dict(torch.load(self._converged_path(), weights_only=True))
        dm = dcopt.convert(model, self.example)
        t0 = time.perf_counter()
        torch.manual_seed(self.p["seed"] + 3)
        hist = dcopt.fit(dm, self.train_batches(self.p["fixed"] + self.p["optimize"] + self.p["settle"]), bce,
                         fixed_epochs=self.conv["fixed"], optimize_epochs=0, settle_epochs=0, lr=self.conv["lr"],
                         val_data=self.val, progress=False)
        trained = dcopt.export(dm)
        self.conv_info = dict(seconds=time.perf_counter() - t0, history=compact_history(hist))
        torch.save(trained.state_dict(), path)
        print(f"conv fixed phase: {self.conv_info['seconds']:.0f} s, val loss "
              f"{[round(r['val_loss'], 4) for r in self.conv_info['history']]}", flush=True)
        model.load_state_dict(trained.state_dict())
        return model

    def run_conv(self, name: str) -> None:
        p, c = self.p, self.conv
        base = self.converged_model()
        start = p["fixed"] + p["optimize"] + p["settle"] + c["fixed"]
        if name == "conv-full":
            dm = dcopt.convert(base, self.example)
            t0 = time.perf_counter()
            torch.manual_seed(p["seed"] + 2)
            hist = dcopt.fit(dm, self.train_batches(start), bce, fixed_epochs=c["optimize"], optimize_epochs=0,
                             settle_epochs=c["settle"], lr=c["lr"], settle_lr=p["settle_lr"], progress=False)
            self.finish(name, "conv-full", dcopt.export(dm), time.perf_counter() - t0,
                        history=compact_history(hist))
            return
        kind, tol = name.split("-")[1], name.split("-")[2]
        fit_kw = dict(lr=c["lr"], settle_lr=p["settle_lr"], settle_epochs=c["settle"], progress=False)
        if kind == "tol":
            opts = dict(kappa_min=0.05, regularizer="macs")
            # the reference fit takes from a fixed phase in the same call: the mean val loss of
            # its last 3 epochs (one evaluation of the checkpoint depends on where the jitter left it)
            last = [h["val_loss"] for h in self.conv_info["history"]][-3:]
            ref = sum(last) / len(last)
            fit_kw.update(tolerance=ToleranceController(float(tol.rstrip("%")) / 100, rate=c["rate"], reference=ref),
                          cross_epochs=c["cross_epochs"], val_data=self.val)
            method = "conv-tolerance"
        else:
            twin = self.get(f"conv-tol-{tol}")
            if twin is None:
                raise RuntimeError(f"{name} needs the result of conv-tol-{tol} (run it first)")
            opts = dict(kappa_min=0.05, target_macs=twin["macs_fraction_dcopt"], beta=p["beta"])
            fit_kw.update(size_lr=p["size_lr"])
            method = "conv-budget"
        self.train_dcopt(name, method, base, opts, start, c["optimize"], fit_kw)

    def run_static(self, name: str) -> None:
        """``static-<run>``: every width scaled uniformly to that run's MACs; ``alloc-<run>``:
        exactly the widths dcopt exported for that run. Both from scratch, all epochs."""
        p = self.p
        target = name.split("-", 1)[1]
        ref = self.get(target)
        if ref is None:
            raise RuntimeError(f"{name} needs the result of {target} (run it first)")
        torch.manual_seed(p["seed"])   # a fresh initialisation (mel-initialised filter bank)
        if name.startswith("alloc-"):
            w = ref["widths"]
            model, mult, method = (CRNN(bands=w["fb"], channels=w["convs"], hidden=w["gru"],
                                        band_order=p["band_order"]), None, "static-dcopt-widths")
        else:
            model, mult = sc.static_scaled(lambda m: build(p, m), macs_example(), ref["macs"] // PER_SECOND, lo=0.02)
            method = "static"
        t0 = time.perf_counter()
        torch.manual_seed(p["seed"] + 1)
        hist = sc.train_plain(model, self.train_batches(0), None, bce, p["fixed"] + p["optimize"] + p["settle"],
                              p["lr"], settle_lr=p["settle_lr"], settle_epochs=p["settle"])
        self.finish(name, method, model, time.perf_counter() - t0, width_mult=mult, target_run=ref["run"],
                    target_macs=ref["macs"], history=compact_history(hist))

    def run_tp(self, name: str) -> None:
        p = self.p
        ref = self.get(name[len("tp-"):])
        if ref is None:
            raise RuntimeError(f"{name} needs the result of {name[len('tp-'):]} (run it first)")
        base = self.fixed_model()
        t0 = time.perf_counter()
        pruned, tp_rec = sc.torch_pruning_baseline(base, macs_example(), ref["macs"] // PER_SECOND,
                                                   ignored_layers=[base.head], steps=p["tp_steps"])
        torch.manual_seed(p["seed"] + 2)
        hist = sc.train_plain(pruned, self.train_batches(p["fixed"]), None, bce, p["optimize"] + p["settle"],
                              p["lr"], settle_lr=p["settle_lr"], settle_epochs=p["settle"])
        self.finish(name, "torch-pruning", pruned, time.perf_counter() - t0, target_run=ref["run"],
                    target_macs=ref["macs"], torch_pruning=tp_rec, history=compact_history(hist))


def results_name(p: dict) -> str:
    """vad, vad-seed<N>, vad-no-rnn-noise, vad-no-rnn-noise-seed<N>: one results file per variant and seed."""
    return NAME + ("" if p.get("rnn_noise") else "-no-rnn-noise") + (f"-seed{p['seed']}" if p["seed"] else "")


def _data_key(split: dict) -> str:
    import hashlib
    h = hashlib.sha256()
    for t in (split["x"], split["y"]):
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _key(p: dict, tiny: bool) -> str:
    import hashlib
    return hashlib.sha256(json.dumps([p, tiny, sd.DATA_VERSION], sort_keys=True).encode()).hexdigest()[:12]


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


# -- report -------------------------------------------------------------------------------

def bank_text(p: dict) -> str:
    order = p.get("band_order", "frequency")
    if order == "nested":
        return ("nested mel bands (`speech_data.nested_mel_filterbank`: every prefix covers the spectrum) at "
                "each model's band count, baselines included")
    return f"mel bands in {order} order, for every run"


def title(p: dict, tiny: bool) -> str:
    return (f"{'[tiny smoke run] ' if tiny else ''}VAD CRNN (filter bank {p['bands']} → conv {p['channels']} → "
            f"GRU {p['hidden']}): frame EER vs MACs per second of audio"
            + ("" if p.get("rnn_noise") else " — dcopt runs with `rnn_noise=False`"))


def _interp_budget(records: list[dict], macs: float) -> Optional[tuple[float, str]]:
    """Budget-mode test EER at ``macs``, linear in log MACs between the budget runs (the
    nearest one outside their range)."""
    pts = sorted((r["macs"], r["metric"]) for r in records if r["method"] == "dcopt-budget")
    if not pts:
        return None
    if macs <= pts[0][0]:
        return pts[0][1], "nearest budget run (below its range)"
    if macs >= pts[-1][0]:
        return pts[-1][1], "nearest budget run (above its range)"
    for (m0, e0), (m1, e1) in zip(pts, pts[1:]):
        if m0 <= macs <= m1:
            t = (math.log(macs) - math.log(m0)) / (math.log(m1) - math.log(m0)) if m1 > m0 else 0.0
            return e0 + t * (e1 - e0), "interpolated between budget runs"
    return None


#: the dcopt runs issue 6 lists (κ_min and budget); the tolerance runs are compared with
#: their static twins too, but do not count towards its "at every budget"
ISSUE6_METHODS = ("dcopt-kappa", "dcopt-budget")


def targets(records: list[dict]) -> dict:
    """The pass/fail lines of issues 6 and 9, computed from the test EERs."""
    full = next((r for r in records if r["method"] == "full"), None)
    out: dict = {}
    if full is None:
        return out
    dc = [r for r in records if r["method"].startswith("dcopt")]
    small = [r for r in dc if r["macs"] <= (1 - TARGET_MACS_CUT) * full["macs"]]
    ok = [r for r in small if 100 * (r["metric"] - full["metric"]) <= TARGET_EER_PP]
    out["issue6_80pct_fewer_macs"] = dict(
        runs_at_or_below_20pct=[(r["run"], round(100 * r["macs"] / full["macs"], 2),
                                 round(100 * (r["metric"] - full["metric"]), 3)) for r in small],
        passing=[r["run"] for r in ok], met=bool(ok))
    vs_static = {}
    for r in dc:
        s = next((x for x in records if x["run"] == f"static-{r['run']}"), None)
        t = next((x for x in records if x["run"] == f"tp-{r['run']}"), None)
        vs_static[r["run"]] = dict(dcopt=r["metric"], static=s["metric"] if s else None,
                                   static_macs_fraction=s["macs"] / full["macs"] if s else None,
                                   torch_pruning=t["metric"] if t else None,
                                   tp_macs_fraction=t["macs"] / full["macs"] if t else None,
                                   dcopt_le_static=(r["metric"] <= s["metric"]) if s else None,
                                   in_issue_list=r["method"] in ISSUE6_METHODS)
    listed = [v for v in vs_static.values() if v["in_issue_list"] and v["dcopt_le_static"] is not None]
    out["issue6_dcopt_le_static"] = dict(per_run=vs_static,
                                         met=all(v["dcopt_le_static"] for v in listed) if listed else None)
    pairs, monotone = tolerance_pairs(records)
    if pairs:
        per_run = {}
        for r, b in pairs:
            per_run[r["run"]] = dict(macs_fraction=r["macs_fraction"], eer=r["metric"], val_bce=r.get("val_bce"),
                                     reference_loss=r.get("reference_loss"),
                                     budget_run=b["run"] if b else None,
                                     budget_macs_fraction=b["macs_fraction"] if b else None,
                                     budget_eer=b["metric"] if b else None,
                                     at_least_as_good=(r["metric"] <= b["metric"]) if b else None)
        fracs = sorted(v["macs_fraction"] for v in per_run.values())
        distinct = len(fracs) > 1 and all(b - a >= 0.05 for a, b in zip(fracs, fracs[1:]))
        out["issue9_tolerance"] = dict(per_run=per_run, distinct_points=distinct, larger_tolerance_smaller=monotone,
                                       met=bool(distinct and monotone and all(v["at_least_as_good"]
                                                                              for v in per_run.values())))
    return out


def tolerance_pairs(records: list[dict]) -> tuple[list[tuple[dict, Optional[dict]]], bool]:
    """Issue 9's study: each conv-tol run (by increasing tolerance) with its budget twin
    (None if not run yet), and whether a larger tolerance bought a smaller model."""
    by = {r["run"]: r for r in records}
    tols = sorted((r for r in records if r["method"] == "conv-tolerance"),
                  key=lambda r: float(r["run"].rsplit("-", 1)[1].rstrip("%")))
    pairs = [(r, by.get(r["run"].replace("conv-tol-", "conv-budget-"))) for r in tols]
    return pairs, all(a["macs"] > b["macs"] for a, b in zip(tols, tols[1:]))


def _seeds(records: list[dict], replicates: dict) -> list[tuple[str, list[dict]]]:
    """Seed 0's records, then each replicate's, by seed."""
    return [("0", records)] + sorted(replicates.items())


def issue6_across_seeds(records: list[dict], replicates: dict) -> list[str]:
    """Issue 6's two VAD targets on every seed (seed 0 and the replicates), from
    :func:`targets` per seed: which seeds reach ≥ 80 % fewer MACs within +1.5 pp, and
    dcopt − static per (run, seed), counted by mode and averaged per run over the seeds."""
    per_seed = [(seed, targets(recs)) for seed, recs in _seeds(records, replicates)]
    per_seed = [(seed, t) for seed, t in per_seed if t]
    if len(per_seed) < 2:
        return []
    cut = [(seed, t["issue6_80pct_fewer_macs"]) for seed, t in per_seed]
    met = [f"seed {seed}: " + (", ".join(f"{n} {d:+.2f} pp" for n, _, d in a["runs_at_or_below_20pct"]) or "none")
           for seed, a in cut]
    diffs: dict[str, list[str]] = {}
    count: dict[str, list[bool]] = {}
    gaps: dict[str, list[float]] = {}
    per_run: dict[str, list[float]] = {}
    unlisted: dict[str, list[float]] = {}
    for seed, t in per_seed:
        for n, v in t["issue6_dcopt_le_static"]["per_run"].items():
            if v["static"] is None:
                continue
            if not v["in_issue_list"]:
                unlisted.setdefault(n, []).append(100 * (v["dcopt"] - v["static"]))
                continue
            diffs.setdefault(n, []).append(f"s{seed} {100 * (v['dcopt'] - v['static']):+.2f}")
            count.setdefault(n.split("-")[0], []).append(v["dcopt_le_static"])
            gaps.setdefault(n.split("-")[0], []).append(100 * (v["dcopt"] - v["static"]))
            per_run.setdefault(n, []).append(100 * (v["dcopt"] - v["static"]))
    by_mode = ", ".join(f"{m} {sum(c)} of {len(c)} (mean {sum(gaps[m]) / len(gaps[m]):+.2f} pp)"
                        for m, c in count.items())
    total = [x for c in count.values() for x in c]
    # the same comparison per budget, averaged over the seeds that ran it: a single pair
    # moves with the seed (two static runs at the same widths, initialised differently,
    # were up to 0.7 pp val EER apart, one-off), its mean over seeds less
    means = {n: sum(g) / len(g) for n, g in per_run.items()}
    averaged = (f"; averaged over seeds, dcopt ≤ static at **{sum(m <= 0 for m in means.values())} of "
                f"{len(means)}** budgets (" + ", ".join(f"{n} {sc.fmt_mean_interval(per_run[n], plan=True)} ({len(per_run[n])} "
                                                        f"seed{'s' * (len(per_run[n]) > 1)})" for n in means)
                + "; ± : 95 % t interval over the seeds; " + sc.SIGN_AT + "; intervals that exclude 0: "
                + (", ".join(f"{n} ({side})" for n in means
                             if (side := sc.sign_beyond_noise(per_run[n])) is not None) or "none") + ")")
    if unlisted:
        averaged += ("; not in issue 6's run list, so not counted: " + ", ".join(
            f"{n} {sum(g) / len(g):+.2f} pp ({len(g)} seed{'s' * (len(g) > 1)})" for n, g in unlisted.items()))
    return [f"* Issue 6 over seeds {', '.join(s for s, _ in per_seed)}: ≥ {100 * TARGET_MACS_CUT:.0f} % fewer MACs at "
            f"≤ +{TARGET_EER_PP} pp met on **{sum(a['met'] for _, a in cut)} of {len(cut)}** seeds (dcopt runs at ≤ "
            f"{100 * (1 - TARGET_MACS_CUT):.0f} % of the MACs, Δ vs that seed's full model: {'; '.join(met)}); dcopt ≤ "
            f"static at **{sum(total)} of {len(total)}** (run, seed) points ({by_mode}){averaged}; dcopt − static, "
            "pp: " + "; ".join(f"{n}: {' / '.join(d)}" for n, d in diffs.items()) + "."]


def _tolerance_gaps(records: list[dict]) -> dict[str, float]:
    """One seed's issue 9 study: tolerance ("1%", …, increasing) → test EER of the tolerance
    run − its budget twin, for the tolerances with both runs done."""
    return {r["run"].replace("conv-tol-", ""): r["metric"] - b["metric"]
            for r, b in tolerance_pairs(records)[0] if b is not None}


def tolerance_across_seeds(records: list[dict], replicates: dict) -> dict[str, list[float]]:
    """Issue 9's study on every seed that has it: per seed (seed 0 first), the test-EER
    difference tolerance run − budget twin for each tolerance with both runs done."""
    gaps = {seed: _tolerance_gaps(recs) for seed, recs in _seeds(records, replicates)}
    return {seed: list(g.values()) for seed, g in gaps.items() if g}


def _tolerance_diffs(records: list[dict], replicates: dict) -> dict[str, list[float]]:
    """Issue 9's study per tolerance (by increasing tolerance): EER tolerance run − budget
    twin on each seed that ran both."""
    diffs: dict[str, list[float]] = {}
    for _, recs in _seeds(records, replicates):
        for tol, gap in _tolerance_gaps(recs).items():
            diffs.setdefault(tol, []).append(gap)
    return {t: diffs[t] for t in sorted(diffs, key=lambda t: float(t.rstrip("%")))}


def tolerance_means(records: list[dict], replicates: dict) -> dict[str, float]:
    """Issue 9's study per tolerance (by increasing tolerance): the mean over the seeds
    that ran both twins of EER tolerance run − budget twin."""
    return {t: sum(d) / len(d) for t, d in _tolerance_diffs(records, replicates).items()}


def observations(records: list[dict]) -> list[str]:
    """Facts worth reading next to the table: which κ runs hit their floor, which runs
    trained identically, and whether tolerance mode's bound ever bound."""
    out = []
    for r in records:
        if r["method"] != "dcopt-kappa":
            continue
        k = r["options"]["kappa_min"]
        floor = [g for g, n in r["sizes"].items() if n <= math.ceil(k * r["group_widths"][g])]
        out.append(f"{r['run']}: kept {r['sizes']} of {r['group_widths']}; "
                   + (f"at the κ_min floor: {', '.join(floor)}" if floor else "no group at its κ_min floor "
                      "(the L2 push and the task's pull balanced above it)") + ".")
    full = next((r for r in records if r["method"] == "full"), None)
    twin = next((r for r in records if r["method"] == "static" and full and r["macs"] == full["macs"]), None)
    if twin is not None:
        out.append(f"{twin['run']} is the full-width CRNN trained from scratch for all epochs: EER "
                   f"{100 * twin['metric']:.2f} % vs the full run's {100 * full['metric']:.2f} % "
                   f"({100 * (twin['metric'] - full['metric']):+.2f} pp) — two training paths of the same model; "
                   "every number here is one seed, so gaps of this size may come from the training path alone.")
    dc = [r for r in records if r["method"].startswith("dcopt")]
    for i, a in enumerate(dc):
        for b in dc[i + 1:]:
            if a["macs"] == b["macs"] and a["metric"] == b["metric"]:
                out.append(f"{a['run']} and {b['run']} ended identical (same seed and batches, and the option that "
                           "differs never came into play).")
    for r in records:
        if r["method"] not in ("dcopt-tolerance", "conv-tolerance"):
            continue
        opt = [h for h in r["history"] if h["phase"] == "optimize"]
        over = sum(1 for h in opt if h["constraint_loss"] is not None and h["loss_bound"] is not None
                   and h["constraint_loss"] > h["loss_bound"])
        vals = [h["constraint_loss"] for h in opt if h["constraint_loss"] is not None]
        out.append(f"{r['run']}: reference val loss {r['reference_loss']:.4f}, bound {opt[0]['loss_bound']:.4f}; "
                   f"val loss during the optimize phase {min(vals):.4f}–{max(vals):.4f}, above the bound in {over} of "
                   f"{len(opt)} epochs; β {opt[0]['beta']:.3g} → {opt[-1]['beta']:.3g}; "
                   f"{sum(bool(h['backtracked']) for h in opt)} backtracks; MACs in the last optimize epoch "
                   f"{100 * opt[-1]['macs_fraction']:.1f} %"
                   + (" (still falling)" if len(opt) > 1 and opt[-1]["macs_fraction"] < opt[-2]["macs_fraction"] - 0.005
                      else "") + f", exported {100 * r['macs_fraction']:.1f} %.")
    return out


def replicate_summary(records: list[dict]) -> list[dict]:
    """The few numbers of a replicate run kept in vad.json (per run: MACs, EERs, widths)."""
    keep = ("run", "method", "macs", "params", "metric", "val_eer", "macs_fraction", "widths", "seconds")
    return [{k: r.get(k) for k in keep} for r in records]


def replicate_notes(replicates: dict, main: list[dict]) -> list[str]:
    lines = []
    for seed, recs in sorted(replicates.items()):
        full = next((r for r in recs if r["method"] == "full"), None)
        if full is None:
            continue
        lines += [f"## Replicate: seed {seed} (a subset of the runs; `vad.py --seed {seed}`)", "",
                  "Another initialisation, batch order and noise, everything else as above; Δ against this seed's "
                  "own full model. Seed 0 (the table above) for comparison.", "",
                  "| run | MACs % of full | EER | Δ vs full (pp) | seed 0: MACs % | seed 0: EER | seed 0: Δ (pp) |",
                  "|---|---|---|---|---|---|---|"]
        full0 = next((r for r in main if r["method"] == "full"), None)
        for r in recs:
            r0 = next((x for x in main if x["run"] == r["run"]), None)
            d = "–" if r is full else f"{100 * (r['metric'] - full['metric']):+.2f}"
            if r0 is not None and full0 is not None:
                d0 = "–" if r0 is full0 else f"{100 * (r0['metric'] - full0['metric']):+.2f}"
                tail = f"{100 * r0['macs'] / full0['macs']:.1f}% | {100 * r0['metric']:.2f}% | {d0}"
            else:
                tail = "– | – | –"
            lines.append(f"| {r['run']} | {100 * r['macs'] / full['macs']:.1f}% | {100 * r['metric']:.2f}% | {d} | "
                         f"{tail} |")
        per_run = targets(recs).get("issue6_dcopt_le_static", {}).get("per_run", {})
        parts = [f"{n} {100 * v['dcopt']:.2f}% vs static {100 * v['static']:.2f}%"
                 for n, v in per_run.items() if v["static"] is not None]
        if parts:
            lines += ["", f"Seed {seed}, dcopt vs static at the same MACs: " + "; ".join(parts) + "."]
        pairs, monotone = tolerance_pairs(recs)
        if pairs:
            parts = [f"{r['run']} {100 * r['macs_fraction']:.1f} % MACs, EER {100 * r['metric']:.2f}%"
                     + (f" vs {b['run']} {100 * b['macs_fraction']:.1f} %, {100 * b['metric']:.2f}%" if b else "")
                     for r, b in pairs]
            lines += ["", f"Seed {seed}, issue 9's study: " + "; ".join(parts)
                      + f"; larger tolerance → smaller model: {'yes' if monotone else '**no**'}."]
        lines.append("")
    return lines


def conv_notes(records: list[dict], conv: Optional[dict], fixed_info: Optional[dict] = None,
               conv_info: Optional[dict] = None) -> list[str]:
    """Issue 9's study: its runs side by side, Δ against the full model trained as long,
    and the jitter of the val loss that decides whether a tolerance can be judged."""
    from dcopt.tolerance import loss_jitter

    rs = [r for r in records if r["method"].startswith("conv-")]
    base = next((r for r in rs if r["method"] == "conv-full"), None)
    if not rs or conv is None:
        return []

    def jitter(info):
        vals = [h["val_loss"] for h in (info or {}).get("history", []) if h.get("val_loss") is not None]
        j = loss_jitter(vals)
        return "–" if j is None else f"{100 * j:.1f} %"

    lines = ["## Issue 9: tolerance vs budget mode, from the converged full model", "",
             f"The `tol-*` runs above take their reference from the shared fixed phase at lr {records_lr(records)}: "
             f"its val loss jitters by {jitter(fixed_info)} between epochs (`dcopt.tolerance.loss_jitter`, last 5 "
             f"epochs), more than either tolerance, and its reference ({ref_of(records)}) is far above the full "
             f"run's final val loss ({full_bce(records)}). The `conv-*` runs start from the "
             f"`full` run's final weights trained on for {conv['fixed']} epochs at lr {conv['lr']:g} (shared, val "
             f"loss jitter {jitter(conv_info)}), then train {conv['optimize']} + {conv['settle']} epochs at lr "
             f"{conv['lr']:g} (settle at the settle lr above). Tolerance runs: `ToleranceController(tol, "
             f"rate={conv['rate']:g})`, `cross_epochs={conv['cross_epochs']:g}`, MACs regularizer, κ_min 0.05, "
             "reference = the mean val loss of the shared phase's last 3 epochs (what fit takes from a fixed phase in "
             "the same call). Budget runs: target = the MACs the "
             "tolerance run with the same tolerance reached, size lr and β as the budget runs above.", "",
             "| run | MACs % of full | kept widths (fb, convs, GRU) | val BCE | EER | Δ vs conv-full (pp) |",
             "|---|---|---|---|---|---|"]
    for r in rs:
        w = r.get("widths", {})
        d = "–" if base is None or r is base else f"{100 * (r['metric'] - base['metric']):+.2f}"
        lines.append(f"| {r['run']} | {100 * r['macs_fraction']:.1f}% | {w.get('fb')}, {w.get('convs')}, "
                     f"{w.get('gru')} | {r['val_bce']:.4f} | {100 * r['metric']:.2f}% | {d} |")
    return lines + [""]


def ref_of(records: list[dict]) -> str:
    r = next((r for r in records if r["method"] == "dcopt-tolerance" and r.get("reference_loss")), None)
    return f"{r['reference_loss']:.4f}" if r else "–"


def full_bce(records: list[dict]) -> str:
    r = next((r for r in records if r["method"] == "full"), None)
    return f"{r['val_bce']:.4f}" if r else "–"


def records_lr(records: list[dict]) -> str:
    r = next((r for r in records if r["method"] == "dcopt-tolerance"), None)
    return f"{r['fit']['lr']:g}" if r else "–"


def notes(records: list[dict], p: dict, fixed_info: Optional[dict], tiny: bool,
          replicates: Optional[dict] = None, conv: Optional[dict] = None, conv_info: Optional[dict] = None) -> str:
    full = next((r for r in records if r["method"] == "full"), None)
    done = {r["run"] for r in records}
    missing = [r for r in ALL_RUNS if r not in done]
    lines = []
    if tiny:
        lines += ["**Tiny smoke run** (8 clips, tiny model, 1 epoch): the numbers mean nothing.", ""]
    if missing:
        lines += [f"**PARTIAL RESULTS**: {len(missing)} of {len(ALL_RUNS)} runs not done yet: "
                  + ", ".join(missing) + ".", ""]
    lines += [
        f"Data: espeak-ng speech in noise, 3 s clips, {p['n_train']} / {p['n_val']} / {p['n_test']} clips "
        f"train / val / test (split by voice: test voices unseen). EER: frame level on the test split; "
        f"MACs per second of audio (100 frames, FlopCounterMode ÷ 2; the GRU as 3·H·(I+H) per step). "
        f"Schedule: {p['fixed']} fixed epochs shared by all runs but `static-*` (which train from scratch for "
        f"all {p['fixed'] + p['optimize'] + p['settle']} epochs), then {p['optimize']} + {p['settle']} epochs "
        f"(optimize + settle at lr {p['settle_lr']:g}); Adam lr {p['lr']:g}, batch {p['batch']}, size lr "
        f"{p['size_lr']:g} (κ and budget runs; tolerance mode: its own, crossing in {p['cross_epochs']:g} epochs). "
        f"κ runs: L2 regularizer, β = {p['beta']:g} fixed. Budget and tolerance runs: κ_min 0.05. "
        f"Filter bank init: {bank_text(p)}. GRU: the optimize phase's per-step noise on its "
        f"recurrence {'on' if p.get('rnn_noise') else 'off'} (`rnn_noise={bool(p.get('rnn_noise'))}`). "
        f"\"wall time\": the run's own training (the shared fixed phase took "
        f"{fixed_info['seconds']:.0f} s)." if fixed_info else "", ""]
    if full is not None and records:
        lines += ["## EER by clip-SNR band (test)", "",
                  "| run | kept widths (fb, convs, GRU) | val EER | " + " | ".join(f"{b} dB" for b in sd.SNR_BAND_NAMES)
                  + " |", "|---|---|---|" + "---|" * len(sd.SNR_BAND_NAMES)]
        for r in records:
            w = r.get("widths", {})
            ws = f"{w.get('fb')}, {w.get('convs')}, {w.get('gru')}" if w else "–"
            lines.append(f"| {r['run']} | {ws} | {100 * r['val_eer']:.2f}% | "
                         + " | ".join("–" if v is None or not math.isfinite(v) else f"{100 * v:.2f}%"
                                      for v in (r["eer_by_band"].get(b) for b in sd.SNR_BAND_NAMES)) + " |")
        cb = full.get("clips_by_band", {})
        lines += ["", "Test clips per band: " + ", ".join(f"{b} dB: {cb.get(b)}" for b in sd.SNR_BAND_NAMES) + ".", ""]
        t = targets(records)
        lines += ["## Targets", ""]
        a = t.get("issue6_80pct_fewer_macs")
        if a:
            runs = ", ".join(f"{n} ({m:.1f} % MACs, {d:+.2f} pp)" for n, m, d in a["runs_at_or_below_20pct"]) or "none"
            lines.append(f"* Issue 6, ≥ 80 % fewer MACs at ≤ +{TARGET_EER_PP} pp EER: "
                         f"**{'met' if a['met'] else 'missed'}**. dcopt runs at ≤ 20 % of the MACs: {runs}.")
        b = t.get("issue6_dcopt_le_static")
        if b and b["per_run"]:
            parts, extra = [], []
            for n, v in b["per_run"].items():
                s = "–" if v["static"] is None else f"{100 * v['static']:.2f}%"
                tp = "–" if v["torch_pruning"] is None else f"{100 * v['torch_pruning']:.2f}%"
                (parts if v["in_issue_list"] else extra).append(
                    f"{n}: dcopt {100 * v['dcopt']:.2f}% vs static {s} vs Torch-Pruning {tp}")
            verdict = "–" if b["met"] is None else ("met" if b["met"] else "missed")
            lines.append(f"* Issue 6, dcopt EER ≤ static at every budget (its κ_min and budget runs): **{verdict}** "
                         f"({'; '.join(parts)})" + (f"; not in its run list, not counted: {'; '.join(extra)}"
                                                    if extra else "") + ".")
        allocs = [r for r in records if r["method"] == "static-dcopt-widths"]
        if allocs:
            by = {r["run"]: r for r in records}
            parts = []
            for r in allocs:
                run = r["target_run"]
                d, st = by.get(run), by.get(f"static-{run}")
                parts.append(f"{run}: dcopt {100 * d['metric']:.2f}%, its widths from scratch "
                             f"{100 * r['metric']:.2f}%, uniform widths {100 * st['metric']:.2f}%" if d and st else run)
            lines.append("* dcopt's training path against its widths trained from scratch like the static baseline "
                         "(`alloc-*`; the same MACs, one seed) — " + "; ".join(parts) + ".")
        c = t.get("issue9_tolerance")
        if c:
            parts = [f"{n}: {100 * v['macs_fraction']:.1f} % MACs, EER {100 * v['eer']:.2f}% vs "
                     + ("–" if v["budget_eer"] is None else
                        f"{v['budget_run']} {100 * v['budget_eer']:.2f}% at {100 * v['budget_macs_fraction']:.1f} % MACs")
                     for n, v in c["per_run"].items()]
            lines.append(f"* Issue 9 on seed 0, tolerance 1 % and 5 % give two different, sensible points, each at least as "
                         f"good as budget mode at the same MACs (runs from the converged full model, below): "
                         f"**{'met' if c['met'] else 'missed'}** ({'; '.join(parts)}; distinct: "
                         f"{'yes' if c['distinct_points'] else 'no'}, larger tolerance → smaller model: "
                         f"{'yes' if c['larger_tolerance_smaller'] else 'no'}).")
            lines += issue6_across_seeds(records, replicates or {})
            seeds = tolerance_across_seeds(records, replicates or {})
            if len(seeds) > 1:
                diffs = [d for ds in seeds.values() for d in ds]
                good = sum(d <= 0 for d in diffs)
                per_seed = "; ".join(f"seed {k}: " + " / ".join(f"{100 * d:+.2f}" for d in ds) for k, ds in seeds.items())
                by_tol = _tolerance_diffs(records, replicates or {})
                means = list(tolerance_means(records, replicates or {}).values())
                lines.append(f"* Issue 9 over seeds {', '.join(seeds)} (seed 0 and the replicates below): tolerance mode "
                             f"at least as good as budget mode at **{good} of {len(diffs)}** points; EER tolerance − "
                             f"budget at the same MACs, pp, by increasing tolerance: {per_seed}; mean "
                             f"{100 * sum(diffs) / len(diffs):+.2f} pp; averaged over seeds per tolerance "
                             + " / ".join(f"{100 * m:+.2f}" for m in means)
                             + f" pp (at least as good at **{sum(m <= 0 for m in means)} of {len(means)}**; with "
                             "95 % t intervals over the seeds: "
                             + ", ".join(f"{t} {sc.fmt_mean_interval([100 * d for d in ds], plan=True)}" for t, ds in by_tol.items())
                             + ").")
        lines.append("")
    lines += conv_notes(records, conv, fixed_info, conv_info)
    if replicates:
        lines += replicate_notes(replicates, records)
    obs = observations(records)
    if obs:
        lines += ["## Observations (computed from the records)", ""] + [f"* {o}" for o in obs] + [""]
    tp = [r for r in records if r["method"] == "torch-pruning"]
    if tp:
        rec = tp[0]["torch_pruning"]
        lines += ["## Torch-Pruning: what it could and could not prune", "",
                  f"{rec.get('package')}, MetaPruner, L2 magnitude importance, the same channel ratio in every "
                  f"layer, raised in {p['tp_steps']} steps until the MACs reach the target. Left alone: "
                  + "; ".join(f"`{k}` ({v})" for k, v in rec.get("left_alone", {}).items()) + ". "
                  "Torch-Pruning has no GRU support (it maps nn.GRU to an element-wise op, and its dependency "
                  "graph crashes with an IndexError on the CPU GRU's autograd graph); this benchmark gives it a "
                  "GRU *input* pruner and a one-op stand-in while it builds the graph, so it can prune the "
                  "channels feeding the GRU, but the GRU's hidden units keep their full width — its MACs "
                  "floor is the GRU's.", ""]
        for r in tp:
            rr = r["torch_pruning"]
            lines.append(f"* {r['run']}: {'ok' if rr['ok'] else 'FAILED: ' + str(rr['error'])}, channel ratio "
                         f"{rr['ratio']:.2f}, reached target: {rr['reached_target']}, widths {r['widths']}.")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="seconds-long smoke run (tiny data, tiny model, 1 epoch)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--only", nargs="+", default=None, metavar="NAME",  # argparse %-formats help: "tol-1%%"
                    help="runs to do, of: " + " ".join(ALL_RUNS).replace("%", "%%"))
    ap.add_argument("--resume", action="store_true", help="keep the runs already in vad.json and skip them")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report-only", action="store_true", help="rewrite vad.md/png/json from vad.json, run nothing")
    ap.add_argument("--replicate", type=Path, nargs="+", default=None, metavar="JSON",
                    help="with --report-only: vad-seed<N>.json files whose runs go into vad.json/md as replicates")
    ap.add_argument("--seed", type=int, default=None,
                    help="another seed (data order, initialisation, noise); results go to vad-seed<N>.*")
    ap.add_argument("--no-rnn-noise", action="store_true",
                    help="dcopt runs with convert(..., rnn_noise=False); results go to vad-no-rnn-noise*")
    ap.add_argument("--state-dir", type=Path, default=None,
                    help="where the fixed-phase checkpoint lives (default: data/, or --out with --tiny)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    p = copy.deepcopy(TINY if args.tiny else FULL)
    if args.seed is not None:
        p["seed"] = args.seed
    if args.no_rnn_noise:
        p["rnn_noise"] = False   # the cached fixed, full and conv phases are shared (Bench.shared_p)
    out_name = results_name(p)
    if args.report_only:
        old = json.loads((args.out / f"{out_name}.json").read_text())
        cfg, recs, fixed = old["config"], old["records"], old.get("fixed_phase")
        reps = old.get("replicates") or {}
        for path in args.replicate or ():
            rep = json.loads(Path(path).read_text())
            reps[str(rep["config"]["p"]["seed"])] = replicate_summary(rep["records"])
        sc.write_results(out_name, recs, args.out, title(cfg["p"], cfg["tiny"]), "EER", config=cfg,
                         notes=notes(recs, cfg["p"], fixed, cfg["tiny"], reps, cfg.get("conv"),
                                     old.get("conv_fixed_phase")),
                         extra=dict(fixed_phase=fixed, conv_fixed_phase=old.get("conv_fixed_phase"),
                                    targets=targets(recs), replicates=reps))
        print((args.out / f"{out_name}.md").read_text())
        return 0
    state_dir = args.state_dir or (args.out if args.tiny else sd.DEFAULT_CACHE_DIR)
    bench = Bench(p, args.out, args.tiny, state_dir, args.threads)
    if args.resume or args.only:
        bench.load()
    runs = args.only or ALL_RUNS
    for name in runs:
        if name not in ALL_RUNS:
            ap.error(f"unknown run {name!r}; runs: {' '.join(ALL_RUNS)}")
    for name in runs:
        if args.resume and bench.get(name) is not None and not args.only:
            continue
        bench.run(name)
    bench.save()
    print((args.out / f"{out_name}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
