"""Locally made speech data for the speech benchmarks (GitHub issue 6).

Nothing is downloaded: speech comes from the ``espeak-ng`` synthesizer (install it with
``scripts/install_system_deps.sh``), noise is made in code, and everything is generated
once with fixed seeds and cached under ``data/`` at the repository root (git-ignored),
keyed by a hash of the configuration, so a rerun loads in well under a second.

Datasets
--------
* :func:`make_vad_dataset` -- voice activity detection: clips of a few seconds built from
  speech segments and random silences, mixed with noise at a random SNR; frame labels
  (10 ms hop, 25 ms window) from the clean speech's short-time energy; per-clip and
  per-frame SNR so the EER can be reported by SNR band (:data:`SNR_BAND_NAMES`).
* :func:`make_kws_dataset` -- keyword spotting: the ten digits spoken in English, German,
  Spanish and French (class = the digit, whatever the language), 1 s clips in noise.
* :func:`make_filterbank_dataset` -- power-spectrum frames (257 bins) of noisy speech and
  their 32-band mel energies (:func:`mel_filterbank` is the target).

Splits are **by voice**: each espeak-ng voice (language + variant) belongs to exactly one
of ``train`` / ``val`` / ``test`` (see :data:`VOICES`), and the variants used for
``test`` are not used in any other split either.

Features: :func:`power_spectrogram` (512-point FFT, 25 ms periodic-Hann window, 10 ms hop
at 16 kHz; frame ``t`` covers samples ``[160 t, 160 t + 400)``, so a clip of ``L``
samples has ``L // 160`` frames) and :func:`log_mel`.

Every ``make_*`` function has a ``tiny=True`` configuration that generates in a second
or two (for tests and smoke runs).
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import warnings
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

__all__ = [
    "SR", "N_FFT", "WIN_LENGTH", "HOP_LENGTH", "N_BINS", "VOICES", "Voice", "DIGIT_WORDS",
    "NOISE_TYPES", "SNR_BAND_EDGES", "SNR_BAND_NAMES", "DEFAULT_CACHE_DIR",
    "EspeakNotFoundError", "espeak_available", "voices_for", "synthesize", "resample",
    "make_noise", "mix_at_snr", "measure_snr", "frame_energy", "vad_labels",
    "power_spectrogram", "mel_filterbank", "log_mel", "snr_band",
    "make_vad_example", "make_vad_dataset", "make_kws_dataset", "make_filterbank_dataset",
]

# Bump when the generated data changes for the same configuration (invalidates caches).
DATA_VERSION = 1

SR = 16000                      # sample rate of everything this module returns
ESPEAK_SR = 22050               # what espeak-ng writes
N_FFT = 512
WIN_LENGTH = 400                # 25 ms
HOP_LENGTH = 160                # 10 ms
N_BINS = N_FFT // 2 + 1         # 257

SNR_BAND_EDGES = (5.0, 15.0, 25.0)
SNR_BAND_NAMES = ("<5", "5-15", "15-25", ">=25")

DEFAULT_CACHE_DIR = Path(os.environ.get("DCOPT_DATA_DIR", Path(__file__).resolve().parents[1] / "data"))

_INSTALL_HINT = ("espeak-ng is not installed (no `espeak-ng` on PATH); the speech benchmarks "
                 "synthesize their data with it. Install it with `bash scripts/install_system_deps.sh` "
                 "(as root; runs `apt-get install -y espeak-ng`).")


class EspeakNotFoundError(RuntimeError):
    """espeak-ng is needed to generate data that is not already cached."""


# --------------------------------------------------------------------------- voices

@dataclass(frozen=True)
class Voice:
    name: str      # espeak-ng ``-v`` argument: language[+variant]
    lang: str      # key into DIGIT_WORDS, or "latin" / "numerals" (VAD text only)
    split: str     # "train" | "val" | "test"


DIGIT_WORDS: dict[str, tuple[str, ...]] = {
    "en": ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
    "de": ("null", "eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun"),
    "es": ("cero", "uno", "dos", "tres", "cuatro", "cinco", "seis", "siete", "ocho", "nueve"),
    "fr": ("zéro", "un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf"),
}

# Variants are split too: train uses (none), f2, f3, m3, m4, m5, klatt; val f1, m2, klatt2;
# test f4, f5, m6, m7, klatt3 -- so a test voice differs from every training voice in
# language/accent *and* in variant.
VOICES: tuple[Voice, ...] = (
    # train
    Voice("en-us", "en", "train"), Voice("en-gb+f2", "en", "train"),
    Voice("en-gb-scotland+m3", "en", "train"), Voice("en-029+f3", "en", "train"),
    Voice("en-us+klatt", "en", "train"), Voice("en-gb-x-gbclan+m5", "en", "train"),
    Voice("de", "de", "train"), Voice("de+f3", "de", "train"), Voice("de+m4", "de", "train"),
    Voice("es", "es", "train"), Voice("es-419+f2", "es", "train"),
    Voice("fr-fr", "fr", "train"), Voice("fr-be+f3", "fr", "train"),
    Voice("it+m3", "latin", "train"), Voice("nl+f2", "latin", "train"), Voice("pl+m4", "latin", "train"),
    Voice("fi+klatt", "latin", "train"), Voice("tr", "latin", "train"),
    Voice("ru", "numerals", "train"), Voice("hi+f3", "numerals", "train"), Voice("cmn+m5", "numerals", "train"),
    # validation
    Voice("en-gb-x-rp+f1", "en", "val"), Voice("de+m2", "de", "val"), Voice("es+klatt2", "es", "val"),
    Voice("fr-ch+m2", "fr", "val"), Voice("pt+f1", "latin", "val"), Voice("ja+klatt2", "numerals", "val"),
    # test
    Voice("en-us-nyc+f4", "en", "test"), Voice("en-gb-x-gbcwmd+m6", "en", "test"),
    Voice("de+f5", "de", "test"), Voice("es-419+m7", "es", "test"), Voice("fr-fr+f4", "fr", "test"),
    Voice("sv+f5", "latin", "test"), Voice("hu+klatt3", "latin", "test"), Voice("ar+m6", "numerals", "test"),
)
_VOICE_INDEX = {v.name: i for i, v in enumerate(VOICES)}
_SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val",
                  "test": "test"}


def _split(split: str) -> str:
    try:
        return _SPLIT_ALIASES[split]
    except KeyError:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}") from None


def voices_for(split: str, task: str = "vad") -> list[Voice]:
    """The voices of one split; ``task="kws"`` keeps those whose language has digit words."""
    split = _split(split)
    vs = [v for v in VOICES if v.split == split]
    if task == "kws":
        vs = [v for v in vs if v.lang in DIGIT_WORDS]
    elif task != "vad":
        raise ValueError(f"task must be 'vad' or 'kws', got {task!r}")
    return vs


# --------------------------------------------------------------------------- espeak-ng

def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def _require_espeak() -> str:
    path = shutil.which("espeak-ng")
    if path is None:
        raise EspeakNotFoundError(_INSTALL_HINT)
    return path


def _read_wav(data: bytes) -> tuple[np.ndarray, int]:
    # espeak-ng --stdout writes a streaming header (frame count 0x7fff...), so read what is there.
    with wave.open(io.BytesIO(data)) as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise RuntimeError(f"unexpected espeak-ng WAV format: {w.getparams()}")
        sr = w.getframerate()
        raw = w.readframes(w.getnframes())
    raw = raw[: len(raw) // 2 * 2]
    return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0, sr


def synthesize(text: str, voice: str, speed: int = 160, pitch: int = 50, word_gap: int = 0,
               amplitude: int = 60, sr: int = SR) -> np.ndarray:
    """Speak ``text`` with espeak-ng; float32 mono audio at ``sr`` (16 kHz by default).

    ``speed`` is words per minute (``-s``), ``pitch`` 0..99 (``-p``), ``word_gap`` the extra
    pause between words in units of 10 ms (``-g``), ``amplitude`` ``-a`` (kept below the
    default 100 so loud voices do not clip inside espeak-ng).
    """
    exe = _require_espeak()
    cmd = [exe, "-v", voice, "-s", str(int(speed)), "-p", str(int(pitch)), "-a", str(int(amplitude)),
           "-g", str(int(word_gap)), "--stdout", text]
    for attempt in range(3):                # a rare garbled stdout has been seen under heavy load
        proc = subprocess.run(cmd, capture_output=True, check=False)
        start = proc.stdout.find(b"RIFF")
        if proc.returncode == 0 and 0 <= start and len(proc.stdout) - start >= 44:
            break
    else:
        raise RuntimeError(f"espeak-ng failed ({' '.join(cmd[:-1])} {text!r}): exit {proc.returncode}, "
                           f"stderr {proc.stderr.decode(errors='replace').strip()!r}, "
                           f"stdout starts {proc.stdout[:80]!r}")
    if start > 0:
        warnings.warn(f"espeak-ng wrote {start} bytes before the WAV header: {proc.stdout[:start][:200]!r}")
    x, sr_in = _read_wav(proc.stdout[start:])
    return resample(x, sr_in, sr) if sr_in != sr else x


# --------------------------------------------------------------------------- resampling

@functools.lru_cache(maxsize=8)
def _resample_matrix(up: int, down: int, zero_crossings: int, rolloff: float, beta: float):
    """Polyphase matrix ``H [W, up]``: output ``up*q + p`` = ``x[down*q - K + 1 : ...] @ H[:, p]``."""
    cutoff = rolloff * min(1.0, up / down)          # relative to the input Nyquist (1 = fs_in/2)
    half = zero_crossings / cutoff                  # kernel half-width in input samples
    k = int(math.ceil(half))
    j = np.arange(-k + 1, k + 1)                    # taps relative to floor(t)
    p = np.arange(up)
    base = p * down // up                           # floor(t) - down*q for output up*q + p
    frac = (p * down % up) / up                     # t - floor(t)
    d = frac[:, None] - j[None, :]                  # t - tap position
    u = np.clip(d / half, -1.0, 1.0)
    window = np.i0(beta * np.sqrt(1.0 - u * u)) / np.i0(beta)
    window[np.abs(d) > half] = 0.0
    h = cutoff * np.sinc(cutoff * d) * window       # [up, 2k]
    width = int(base[-1]) + 2 * k
    mat = np.zeros((width, up))
    rows = base[:, None] + (j[None, :] + k - 1)
    mat[rows, np.broadcast_to(p[:, None], rows.shape)] = h
    return k, mat


def resample(x: np.ndarray, sr_in: int, sr_out: int, zero_crossings: int = 24,
             rolloff: float = 0.94, beta: float = 8.6) -> np.ndarray:
    """Band-limited resampling with a Kaiser-windowed sinc (polyphase, exact rational ratio).

    Output sample ``n`` is the input interpolated at time ``n * sr_in / sr_out``; when
    downsampling, the sinc's cutoff is ``rolloff`` times the output Nyquist (anti-aliasing).
    Output length is ``ceil(len(x) * sr_out / sr_in)``.
    """
    x = np.asarray(x, dtype=np.float64)
    if sr_in == sr_out or len(x) == 0:
        return x.astype(np.float32)
    g = math.gcd(int(sr_in), int(sr_out))
    up, down = int(sr_out) // g, int(sr_in) // g
    k, mat = _resample_matrix(up, down, zero_crossings, float(rolloff), float(beta))
    n_out = -(-len(x) * up // down)
    q = -(-n_out // up)
    width = mat.shape[0]
    xp = np.zeros(down * (q - 1) + width)
    xp[k - 1:k - 1 + len(x)] = x[: len(xp) - (k - 1)]
    frames = np.lib.stride_tricks.sliding_window_view(xp, width)[::down][:q]   # [q, width]
    return (np.ascontiguousarray(frames) @ mat).reshape(-1)[:n_out].astype(np.float32)


# --------------------------------------------------------------------------- noise

NOISE_TYPES = ("white", "pink", "brown", "band", "hum", "clicks", "mixture")


def _unit_rms(x: np.ndarray) -> np.ndarray:
    return x / max(float(np.sqrt(np.mean(x * x))), 1e-12)


def _shaped(rng: np.random.Generator, n: int, gain: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1.0 / SR)
    return np.fft.irfft(spec * gain(f), n)


def _noise_one(kind: str, rng: np.random.Generator, n: int) -> np.ndarray:
    t = np.arange(n) / SR
    if kind == "white":
        x = rng.standard_normal(n)
    elif kind == "pink":                                   # power ~ 1/f
        x = _shaped(rng, n, lambda f: 1.0 / np.sqrt(np.maximum(f, 20.0)))
    elif kind == "brown":                                  # power ~ 1/f^2
        x = _shaped(rng, n, lambda f: 1.0 / np.maximum(f, 20.0))
    elif kind == "band":                                   # white noise in a random band
        lo = float(np.exp(rng.uniform(np.log(80.0), np.log(4000.0))))
        hi = min(lo * 2.0 ** rng.uniform(0.5, 3.0), 7800.0)
        edge = 0.15                                        # raised-cosine edges, in octaves

        def band(f):
            lf = np.log2(np.maximum(f, 1.0))
            a = np.clip((lf - np.log2(lo)) / edge + 0.5, 0, 1)
            b = np.clip((np.log2(hi) - lf) / edge + 0.5, 0, 1)
            return np.sin(0.5 * np.pi * a) * np.sin(0.5 * np.pi * b)
        x = _shaped(rng, n, band)
    elif kind == "hum":                                    # mains hum + harmonics
        f0 = (50.0 if rng.random() < 0.5 else 60.0) * (1.0 + rng.uniform(-0.005, 0.005))
        n_harm = int(rng.integers(4, 40))
        decay = rng.uniform(0.3, 1.5)
        x = np.zeros(n)
        for k in range(1, n_harm + 1):
            if k * f0 > 7500:
                break
            amp = k ** -decay * np.exp(rng.normal(0.0, 0.5))
            x += amp * np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi))
        x = _unit_rms(x) + 10 ** (rng.uniform(-50, -25) / 20) * rng.standard_normal(n)
    elif kind == "clicks":                                 # impulsive noise on a low floor
        x = 10 ** (rng.uniform(-40, -20) / 20) * rng.standard_normal(n)
        rate = rng.uniform(2.0, 40.0)                      # clicks per second
        n_clicks = max(1, rng.poisson(rate * n / SR))
        for pos in rng.integers(0, n, n_clicks):
            length = int(rng.integers(8, 160))             # 0.5 .. 10 ms
            seg = min(length, n - pos)
            env = np.exp(-np.arange(seg) / max(1.0, length / 4.0))
            x[pos:pos + seg] += np.exp(rng.normal(0.0, 0.7)) * env * rng.standard_normal(seg)
    else:
        raise ValueError(f"unknown noise type {kind!r}; one of {NOISE_TYPES}")
    x = _unit_rms(x)
    if kind in ("white", "pink", "band") and rng.random() < 0.3:   # slow level changes
        x = _unit_rms(x * (1.0 + rng.uniform(0.2, 0.8) * np.sin(2 * np.pi * rng.uniform(0.1, 2.0) * t
                                                                  + rng.uniform(0, 2 * np.pi))))
    return x


def make_noise(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` samples (16 kHz) of unit-RMS noise of one of :data:`NOISE_TYPES`."""
    if kind == "mixture":
        kinds = rng.choice(np.array(NOISE_TYPES[:-1]), size=int(rng.integers(2, 4)), replace=False)
        x = sum(10 ** (rng.uniform(-10, 0) / 20) * _noise_one(str(k), rng, n) for k in kinds)
        return _unit_rms(x).astype(np.float32)
    return _noise_one(kind, rng, n).astype(np.float32)


def _active_samples(labels: np.ndarray | None, n: int) -> np.ndarray | None:
    if labels is None:
        return None
    mask = np.repeat(np.asarray(labels) > 0.5, HOP_LENGTH)[:n]
    return np.concatenate([mask, np.zeros(n - len(mask), bool)]) if len(mask) < n else mask


def measure_snr(speech: np.ndarray, noise: np.ndarray, labels: np.ndarray | None = None) -> float:
    """SNR in dB: speech power over its active frames (``labels``; all samples if None)
    divided by the noise power over the whole clip."""
    speech = np.asarray(speech, np.float64)
    noise = np.asarray(noise, np.float64)
    act = _active_samples(labels, len(speech))
    ps = np.mean(speech[act] ** 2) if act is not None and act.any() else np.mean(speech ** 2)
    return float(10 * np.log10(ps / max(np.mean(noise ** 2), 1e-30)))


def mix_at_snr(speech: np.ndarray, noise: np.ndarray, snr_db: float,
               labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scale ``noise`` so that :func:`measure_snr` gives ``snr_db``; returns (mix, scaled noise)."""
    speech = np.asarray(speech, np.float64)
    noise = np.asarray(noise, np.float64)
    gain = 10 ** ((measure_snr(speech, noise, labels) - snr_db) / 20)
    noise = noise * gain
    return (speech + noise).astype(np.float32), noise.astype(np.float32)


# --------------------------------------------------------------------------- features

@functools.lru_cache(maxsize=4)
def _hann(n: int) -> np.ndarray:
    return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)      # periodic Hann


def _frames_np(x: np.ndarray) -> np.ndarray:
    x = np.concatenate([np.asarray(x, np.float64), np.zeros(WIN_LENGTH - HOP_LENGTH)])
    return np.lib.stride_tricks.sliding_window_view(x, WIN_LENGTH)[::HOP_LENGTH]


def frame_energy(x: np.ndarray) -> np.ndarray:
    """Hann-windowed energy of each 25 ms / 10 ms frame (``len(x) // 160`` frames)."""
    return np.sum((_frames_np(x) * _hann(WIN_LENGTH)) ** 2, axis=-1)


def vad_labels(clean: np.ndarray, threshold_db: float = 40.0, hangover: int = 3) -> np.ndarray:
    """Frame labels from clean speech: energy within ``threshold_db`` of the clip's peak
    frame energy is speech; each speech frame also marks the next ``hangover`` frames."""
    e = frame_energy(clean)
    peak = float(e.max()) if len(e) else 0.0
    if peak <= 0.0:
        return np.zeros(len(e), np.float32)
    raw = e > peak * 10 ** (-threshold_db / 10)
    lab = raw.copy()
    for k in range(1, hangover + 1):
        lab[k:] |= raw[:-k]
    return lab.astype(np.float32)


def power_spectrogram(audio) -> torch.Tensor:
    """Power spectra ``|FFT|^2`` of 25 ms periodic-Hann frames, 10 ms hop, 512-point FFT.

    ``audio``: array/tensor ``[..., L]`` at 16 kHz → float32 ``[..., 257, L // 160]``.
    Frame ``t`` covers samples ``[160 t, 160 t + 400)`` (zero-padded at the end).
    """
    x = torch.as_tensor(np.asarray(audio) if not isinstance(audio, torch.Tensor) else audio,
                        dtype=torch.float32)
    x = torch.nn.functional.pad(x, (0, WIN_LENGTH - HOP_LENGTH))
    frames = x.unfold(-1, WIN_LENGTH, HOP_LENGTH)                        # [..., T, 400]
    window = torch.hann_window(WIN_LENGTH, periodic=True, dtype=torch.float32)
    spec = torch.fft.rfft(frames * window, n=N_FFT)                    # [..., T, 257]
    return (spec.real ** 2 + spec.imag ** 2).transpose(-1, -2).contiguous()


def _hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)


def _mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)


def mel_filterbank(n_mels: int, n_fft: int = N_FFT, sr: int = SR, f_min: float = 0.0,
                   f_max: float | None = None) -> torch.Tensor:
    """Triangular mel filter bank ``[n_mels, n_fft // 2 + 1]`` (float32), HTK mel scale
    ``m = 2595 log10(1 + f / 700)``.

    Band ``i`` rises linearly from centre ``i - 1`` to centre ``i`` and falls to centre
    ``i + 1`` (``n_mels + 2`` points equally spaced in mel from ``f_min`` to ``f_max``);
    peak height 1 and no area normalisation, so between the first and the last centre the
    bands sum to exactly 1 at every FFT bin. Mel energies are ``fb @ power``.
    """
    f_max = sr / 2 if f_max is None else f_max
    if not 0 <= f_min < f_max <= sr / 2:
        raise ValueError(f"need 0 <= f_min < f_max <= sr/2, got {f_min}, {f_max}")
    centre = np.arange(1, n_mels + 1)
    return _triangles(n_mels, n_fft, sr, f_min, f_max, centre - 1, centre, centre + 1)


def _triangles(n_mels: int, n_fft: int, sr: int, f_min: float, f_max: float, lo, ce, hi) -> torch.Tensor:
    """Triangles over ``n_mels + 2`` points equally spaced in mel from ``f_min`` to
    ``f_max``: row i rises from point ``lo[i]`` to ``ce[i]`` (height 1) and falls to
    ``hi[i]``, evaluated at the FFT bin frequencies."""
    pts = _mel_to_hz(np.linspace(_hz_to_mel(f_min), _hz_to_mel(f_max), n_mels + 2))
    f = np.arange(n_fft // 2 + 1) * sr / n_fft
    lo, ce, hi = (pts[np.asarray(i)][:, None] for i in (lo, ce, hi))
    up = (f[None, :] - lo) / (ce - lo)
    down = (hi - f[None, :]) / (hi - ce)
    return torch.from_numpy(np.clip(np.minimum(up, down), 0.0, None).astype(np.float32))


def nested_mel_filterbank(n_mels: int, n_fft: int = N_FFT, sr: int = SR) -> torch.Tensor:
    """``n_mels`` triangular bands on the mel centres of :func:`mel_filterbank`, in
    :func:`dcopt.spread_order`, band ``j`` spanning :func:`dcopt.spread_reach` centres to
    each side of its own (clipped to the range) instead of one: every prefix of the rows
    covers the whole spectrum (a prefix of the narrow mel bands leaves gaps between them).
    Peak height 1, as in :func:`mel_filterbank`."""
    import dcopt

    centre = np.asarray(dcopt.spread_order(n_mels)) + 1
    reach = np.asarray(dcopt.spread_reach(n_mels))
    return _triangles(n_mels, n_fft, sr, 0.0, sr / 2, np.maximum(centre - reach, 0), centre,
                      np.minimum(centre + reach, n_mels + 1))


def log_mel(audio=None, n_mels: int = 40, power: torch.Tensor | None = None,
            eps: float = 1e-6) -> torch.Tensor:
    """``log(mel_filterbank(n_mels) @ power_spectrogram(audio) + eps)`` → ``[..., n_mels, T]``."""
    if power is None:
        power = power_spectrogram(audio)
    fb = mel_filterbank(n_mels, N_FFT, SR)
    return torch.log(torch.matmul(fb, power) + eps)


def snr_band(snr) -> torch.Tensor:
    """Index into :data:`SNR_BAND_NAMES` (``<5``, ``5-15``, ``15-25``, ``>=25`` dB)."""
    return torch.bucketize(torch.as_tensor(snr, dtype=torch.float32),
                           torch.tensor(SNR_BAND_EDGES), right=True)


def _features(audio: np.ndarray, kind: str, n_mels: int) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
    if kind == "audio":
        return x
    out = []
    for s in range(0, len(x), 128):
        p = power_spectrogram(x[s:s + 128])
        out.append(p if kind == "power" else log_mel(power=p, n_mels=n_mels))
    return torch.cat(out) if out else torch.empty(0)


# --------------------------------------------------------------------------- text

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "tr", "st",
           "pl", "kr", "gr", "sp", "", "", "")
_NUCLEI = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ou", "ei", "au")
_CODAS = ("", "", "", "n", "r", "s", "l", "t", "m", "k")


def _pseudo_word(rng) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS)
                   for _ in range(int(rng.integers(1, 4))))


def _random_text(rng, lang: str, n_sentences: int) -> str:
    out = []
    for _ in range(n_sentences):
        words = []
        for _ in range(int(rng.integers(1, 7))):
            r = rng.random()
            if r < 0.2 or lang == "numerals":
                words.append(str(int(rng.integers(0, 10 ** int(rng.integers(1, 5))))))
            elif r < 0.45 and lang in DIGIT_WORDS:
                words.append(DIGIT_WORDS[lang][int(rng.integers(10))])
            else:
                words.append(_pseudo_word(rng))
            if rng.random() < 0.12:
                words[-1] += ","
        out.append(" ".join(words) + str(rng.choice([".", ".", ".", "?", "!"])))
    return " ".join(out)


def _segments(x: np.ndarray, min_silence: float = 0.1, rel_db: float = 50.0) -> list[np.ndarray]:
    """Split synthesized audio at silences of at least ``min_silence`` s (frames more than
    ``rel_db`` below the loudest frame); each piece is trimmed to its first/last loud frame."""
    e = frame_energy(x)
    if len(e) == 0 or e.max() <= 0:
        return []
    loud = np.flatnonzero(e > e.max() * 10 ** (-rel_db / 10))
    gap = int(round(min_silence * SR / HOP_LENGTH))
    breaks = np.flatnonzero(np.diff(loud) > gap)
    starts = np.concatenate([[loud[0]], loud[breaks + 1]])
    ends = np.concatenate([loud[breaks], [loud[-1]]])
    return [x[s * HOP_LENGTH: min(len(x), e_ * HOP_LENGTH + WIN_LENGTH)] for s, e_ in zip(starts, ends)]


def _fade(x: np.ndarray, n: int = 80) -> np.ndarray:
    x = x.copy()
    n = min(n, len(x) // 2)
    if n > 0:
        r = np.linspace(0.0, 1.0, n)
        x[:n] *= r
        x[-n:] *= r[::-1]
    return x


def _draw_snr(rng, snr_range: tuple[float, float], clean_fraction: float) -> float:
    if rng.random() < clean_fraction:
        return float(rng.uniform(25.0, 40.0))
    return float(rng.uniform(*snr_range))


def _finish(rng, clean: np.ndarray, labels: np.ndarray, snr_db: float, noise_type: str) -> dict:
    """Level-normalize clean speech, add noise at ``snr_db``, keep the mix below clipping."""
    act = _active_samples(labels, len(clean))
    if not act.any():
        raise RuntimeError("no speech in the clip (espeak-ng produced silence?)")
    level = 10 ** (rng.uniform(-35.0, -20.0) / 20)                       # active speech RMS (dBFS)
    clean = clean * (level / max(float(np.sqrt(np.mean(clean[act] ** 2))), 1e-12))
    _, noise = mix_at_snr(clean, make_noise(noise_type, len(clean), rng), snr_db, labels)
    peak = float(np.max(np.abs(clean + noise)))
    if peak > 0.99:
        clean, noise = clean * (0.99 / peak), noise * (0.99 / peak)
    clean = clean.astype(np.float32)
    noise = noise.astype(np.float32)
    es, en = frame_energy(clean), frame_energy(noise)
    frame_snr = np.clip(10 * np.log10((es + 1e-12) / (en + 1e-12)), -60.0, 60.0)
    return dict(audio=(clean + noise).astype(np.float32), clean=clean, noise=noise,
                labels=labels.astype(np.float32), snr=measure_snr(clean, noise, labels),
                frame_snr=frame_snr.astype(np.float32), noise_type=noise_type)


# --------------------------------------------------------------------------- VAD

def make_vad_example(rng: np.random.Generator, split: str = "train", clip_seconds: float = 3.0,
                     snr_db: float | None = None, noise_type: str | None = None,
                     voice: str | None = None, snr_range: tuple[float, float] = (-5.0, 25.0),
                     clean_fraction: float = 0.15) -> dict:
    """One VAD clip: speech segments of one voice of ``split`` at random positions, in noise.

    Returns numpy arrays ``audio`` (the mix), ``clean``, ``noise`` ([L] float32, 16 kHz),
    ``labels`` and ``frame_snr`` ([L // 160]), and ``snr`` (dB, as :func:`measure_snr`
    over the speech frames), ``voice``, ``noise_type``.
    """
    n = int(round(clip_seconds * SR))
    vs = voices_for(split, "vad")
    v = VOICES[_VOICE_INDEX[voice]] if voice is not None else vs[int(rng.integers(len(vs)))]
    speed, pitch = int(rng.integers(110, 231)), int(rng.integers(15, 86))
    text = _random_text(rng, v.lang, max(2, int(math.ceil(clip_seconds / 1.2)) + 1))
    segs = _segments(synthesize(text, v.name, speed, pitch, word_gap=int(rng.integers(0, 15))),
                     min_silence=0.1)
    clean = np.zeros(n, np.float64)
    pos = int(rng.uniform(0.0, 0.5) * n) if rng.random() < 0.85 else 0
    for seg in segs:
        if pos >= n:
            break
        piece = _fade(seg[: n - pos]) * 10 ** (rng.uniform(-4.0, 4.0) / 20)
        clean[pos:pos + len(piece)] += piece
        pos += len(seg) + int(rng.uniform(0.15, 1.5) * SR)
    labels = vad_labels(clean)
    if noise_type is None:
        noise_type = NOISE_TYPES[int(rng.integers(len(NOISE_TYPES)))]
    if snr_db is None:
        snr_db = _draw_snr(rng, snr_range, clean_fraction)
    out = _finish(rng, clean, labels, snr_db, noise_type)
    out["voice"] = v.name
    return out


def _rng(seed: int, *keys) -> np.random.Generator:
    extra = [int.from_bytes(hashlib.sha256(str(k).encode()).digest()[:4], "little") for k in keys]
    return np.random.default_rng(np.random.SeedSequence([int(seed), *extra]))


def _cached(kind: str, config: dict, build: Callable[[], dict], cache_dir) -> dict:
    if cache_dir is None:
        return build()
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"{kind}-{config.get('split', 'all')}-{key}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    data = build()
    data["config"] = config
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(data, tmp)
    os.replace(tmp, path)
    return data


_TINY = dict(vad=8, kws=2, filterbank=2000)
_FULL_VAD = dict(train=1000, val=200, test=400)
_FULL_KWS = dict(train=200, val=30, test=60)


def make_vad_dataset(split: str = "train", n_clips: int | None = None, seed: int = 0,
                     cache_dir: str | os.PathLike | None = DEFAULT_CACHE_DIR, *, tiny: bool = False,
                     features: str = "logmel", n_mels: int = 40, clip_seconds: float = 3.0,
                     snr_range: tuple[float, float] = (-5.0, 25.0), clean_fraction: float = 0.15) -> dict:
    """Voice-activity-detection clips of voices of ``split`` (``train``/``val``/``test``).

    ``n_clips`` defaults to 1000 / 200 / 400 (``tiny``: 8). ``features``: ``"logmel"``
    (``[N, n_mels, T]``), ``"power"`` (``[N, 257, T]``) or ``"audio"`` (``[N, L]``, 16 kHz).
    Returns a dict with ``features``, ``labels`` (float32 0/1 ``[N, T]``), ``snr`` (clip SNR
    in dB, ``[N]``), ``frame_snr`` (``[N, T]``), ``voice`` (index into ``voices``),
    ``noise_type`` (index into ``noise_types``), ``voices``, ``noise_types``, ``config``.
    ``T = clip_seconds * 100``. SNRs: uniform in ``snr_range`` except a ``clean_fraction``
    uniform in 25..40 dB. Cached under ``cache_dir`` (None: no cache).
    """
    split = _split(split)
    if features not in ("logmel", "power", "audio"):
        raise ValueError(f"features must be 'logmel', 'power' or 'audio', got {features!r}")
    n_clips = n_clips if n_clips is not None else (_TINY["vad"] if tiny else _FULL_VAD[split])
    config = dict(kind="vad", version=DATA_VERSION, split=split, n=int(n_clips), seed=int(seed),
                  features=features, n_mels=int(n_mels) if features == "logmel" else None,
                  clip_seconds=float(clip_seconds), snr_range=[float(s) for s in snr_range],
                  clean_fraction=float(clean_fraction), voices=[v.name for v in voices_for(split)])

    def build() -> dict:
        _require_espeak()
        rng = _rng(seed, "vad", split)
        ex = [make_vad_example(rng, split, clip_seconds, snr_range=tuple(snr_range),
                               clean_fraction=clean_fraction) for _ in range(n_clips)]
        audio = np.stack([e["audio"] for e in ex])
        return dict(
            features=_features(audio, features, n_mels),
            labels=torch.from_numpy(np.stack([e["labels"] for e in ex])),
            snr=torch.tensor([e["snr"] for e in ex], dtype=torch.float32),
            frame_snr=torch.from_numpy(np.stack([e["frame_snr"] for e in ex])),
            voice=torch.tensor([_VOICE_INDEX[e["voice"]] for e in ex], dtype=torch.long),
            noise_type=torch.tensor([NOISE_TYPES.index(e["noise_type"]) for e in ex], dtype=torch.long),
            voices=[v.name for v in VOICES], noise_types=list(NOISE_TYPES))

    return _cached("vad", config, build, cache_dir)


# --------------------------------------------------------------------------- KWS

def _kws_words(rng, split: str, labels: Sequence[int], max_len: int) -> list[tuple[np.ndarray, str]]:
    """Speak each digit of ``labels`` (batches of up to 10 words per espeak-ng call)."""
    vs = voices_for(split, "kws")
    out: list[tuple[np.ndarray, str]] = []
    for s in range(0, len(labels), 10):
        batch = labels[s:s + 10]
        v = vs[int(rng.integers(len(vs)))]
        speed, pitch = int(rng.integers(120, 221)), int(rng.integers(15, 86))
        words = [DIGIT_WORDS[v.lang][d] for d in batch]
        segs = _segments(synthesize(" ".join(words), v.name, speed, pitch, word_gap=60), min_silence=0.15)
        if len(segs) != len(words):           # a word split at a pause (or two merged): one by one
            segs = []
            for w in words:
                pieces = _segments(synthesize(w, v.name, speed, pitch), min_silence=10.0)
                segs.append(pieces[0] if pieces else np.zeros(HOP_LENGTH, np.float32))
        for seg in segs:
            if len(seg) > max_len:            # rare (slow speech); keep the start
                seg = _fade(seg[:max_len])
            out.append((seg, v.name))
    return out


def make_kws_dataset(split: str = "train", n_per_class: int | None = None, seed: int = 0,
                     cache_dir: str | os.PathLike | None = DEFAULT_CACHE_DIR, *, tiny: bool = False,
                     features: str = "logmel", n_mels: int = 40, clip_seconds: float = 1.0,
                     snr_range: tuple[float, float] = (-5.0, 25.0), clean_fraction: float = 0.15) -> dict:
    """Spoken digits 0-9 (English, German, Spanish, French voices of ``split``) in noise.

    ``n_per_class`` defaults to 200 / 30 / 60 (``tiny``: 2). Returns ``features``
    (``[N, n_mels, 100]`` log-mel, ``[N, 257, 100]`` power or ``[N, 16000]`` audio),
    ``labels`` (int64 digit ``[N]``), ``snr`` ``[N]``, ``voice``, ``noise_type`` (indices into
    ``voices`` / ``noise_types``), ``language`` (index into ``languages``), ``config``.
    Clips are in shuffled order; each word sits at a random offset in its clip.
    """
    split = _split(split)
    if features not in ("logmel", "power", "audio"):
        raise ValueError(f"features must be 'logmel', 'power' or 'audio', got {features!r}")
    n_per_class = n_per_class if n_per_class is not None else (_TINY["kws"] if tiny else _FULL_KWS[split])
    config = dict(kind="kws", version=DATA_VERSION, split=split, n=int(n_per_class), seed=int(seed),
                  features=features, n_mels=int(n_mels) if features == "logmel" else None,
                  clip_seconds=float(clip_seconds), snr_range=[float(s) for s in snr_range],
                  clean_fraction=float(clean_fraction), voices=[v.name for v in voices_for(split, "kws")])

    def build() -> dict:
        _require_espeak()
        rng = _rng(seed, "kws", split)
        n = int(round(clip_seconds * SR))
        labels = rng.permutation(np.repeat(np.arange(10), n_per_class))
        words = _kws_words(rng, split, list(labels), max_len=n - 2 * HOP_LENGTH)
        audio, snr, voice, noise_type = [], [], [], []
        for seg, vname in words:
            clean = np.zeros(n, np.float64)
            pos = int(rng.integers(0, n - len(seg) + 1))
            clean[pos:pos + len(seg)] = _fade(seg, 32)
            nt = NOISE_TYPES[int(rng.integers(len(NOISE_TYPES)))]
            ex = _finish(rng, clean, vad_labels(clean), _draw_snr(rng, snr_range, clean_fraction), nt)
            audio.append(ex["audio"])
            snr.append(ex["snr"])
            voice.append(_VOICE_INDEX[vname])
            noise_type.append(NOISE_TYPES.index(nt))
        langs = list(DIGIT_WORDS)
        return dict(
            features=_features(np.stack(audio), features, n_mels),
            labels=torch.from_numpy(labels.astype(np.int64)),
            snr=torch.tensor(snr, dtype=torch.float32),
            voice=torch.tensor(voice, dtype=torch.long),
            noise_type=torch.tensor(noise_type, dtype=torch.long),
            language=torch.tensor([langs.index(VOICES[i].lang) for i in voice], dtype=torch.long),
            voices=[v.name for v in VOICES], noise_types=list(NOISE_TYPES), languages=langs)

    return _cached("kws", config, build, cache_dir)


# --------------------------------------------------------------------------- filter bank

def _synthetic_frames(rng, n: int) -> np.ndarray:
    """Speech-like power spectra without espeak-ng: harmonic source (random f0) or unvoiced
    (fricative-like) noise through 3-5 random formants, plus a coloured noise floor."""
    f = np.arange(N_BINS) * SR / N_FFT
    n_form = 5
    fc = rng.uniform(200, 6000, (n, n_form, 1))
    bw = rng.uniform(60, 500, (n, n_form, 1))
    amp = np.exp(rng.normal(0, 1, (n, n_form, 1))) * (np.arange(n_form)[None, :, None]
                                                      < rng.integers(3, n_form + 1, (n, 1, 1)))
    env = (amp / (1 + ((f - fc) / bw) ** 2)).sum(1) * (1 + f / 500.0) ** -rng.uniform(0.5, 2.0, (n, 1))
    f0 = rng.uniform(80, 400, (n, 1))
    k = np.round(f / f0)
    harmonic = np.exp(-0.5 * ((f - k * f0) / 20.0) ** 2) * (k >= 1) * (f < 7900)
    voiced = rng.random((n, 1)) < 0.7
    src = np.where(voiced, harmonic, 1.0) * rng.exponential(1.0, (n, N_BINS))
    floor = (10 ** rng.uniform(-5, -1, (n, 1)) * (1 + f / 1000.0) ** -rng.uniform(0, 2, (n, 1))
             * rng.exponential(1.0, (n, N_BINS)))
    return 10 ** rng.uniform(-3, 2, (n, 1)) * (env * src + floor)


def make_filterbank_dataset(n: int | None = None, seed: int = 0, n_mels: int = 32,
                            cache_dir: str | os.PathLike | None = DEFAULT_CACHE_DIR, *, tiny: bool = False,
                            split: str = "train", source: str = "speech", frames_per_clip: int = 100) -> dict:
    """Power-spectrum frames and their mel energies, for the filter-bank benchmark.

    ``source="speech"``: random frames (speech and pauses) of noisy VAD clips of the voices
    of ``split`` (SNRs -5..40 dB, all noise types), ``frames_per_clip`` per 3 s clip;
    ``source="synthetic"``: speech-like spectra from a harmonic/formant model (no espeak-ng).
    Returns ``inputs`` float32 ``[n, 257]`` (power spectra as :func:`power_spectrogram`),
    ``targets`` float32 ``[n, n_mels]`` = ``inputs @ filterbank.T``, ``filterbank``
    ``[n_mels, 257]`` (:func:`mel_filterbank`), ``config``. ``n`` defaults to 50000 (tiny: 2000).
    """
    split = _split(split)
    if source not in ("speech", "synthetic"):
        raise ValueError(f"source must be 'speech' or 'synthetic', got {source!r}")
    n = n if n is not None else (_TINY["filterbank"] if tiny else 50000)
    config = dict(kind="filterbank", version=DATA_VERSION, split=split, n=int(n), seed=int(seed),
                  n_mels=int(n_mels), source=source,
                  frames_per_clip=int(frames_per_clip) if source == "speech" else None,
                  voices=[v.name for v in voices_for(split)] if source == "speech" else None)

    def build() -> dict:
        rng = _rng(seed, "filterbank", split, source)
        if source == "synthetic":
            inputs = torch.from_numpy(_synthetic_frames(rng, n).astype(np.float32))
        else:
            _require_espeak()
            chunks, have = [], 0
            while have < n:
                ex = make_vad_example(rng, split, 3.0)
                p = power_spectrogram(ex["audio"]).T                    # [T, 257]
                k = min(frames_per_clip, n - have, len(p))
                chunks.append(p[torch.from_numpy(rng.choice(len(p), k, replace=False))])
                have += k
            inputs = torch.cat(chunks)
        fb = mel_filterbank(n_mels, N_FFT, SR)
        return dict(inputs=inputs, targets=inputs @ fb.T, filterbank=fb)

    return _cached("filterbank", config, build, cache_dir)
