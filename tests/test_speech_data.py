"""Fast checks of the locally made speech data (benchmarks/speech_data.py, issue 6).

Tests that synthesize speech skip when espeak-ng is not installed
(install it with scripts/install_system_deps.sh); the rest run everywhere.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import speech_data as sd  # noqa: E402

needs_espeak = pytest.mark.skipif(
    not sd.espeak_available(),
    reason="espeak-ng not installed; run `bash scripts/install_system_deps.sh` to enable the speech-data tests")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("speech_cache")


@pytest.fixture(scope="module")
def vad_tiny(cache):
    return sd.make_vad_dataset("train", seed=0, cache_dir=cache, tiny=True)


@pytest.fixture(scope="module")
def kws_tiny(cache):
    return sd.make_kws_dataset("train", seed=0, cache_dir=cache, tiny=True)


# --------------------------------------------------------------------------- no espeak needed

def test_mel_filterbank_is_triangular_and_partitions_unity():
    for n_mels in (32, 40, 64):
        fb = sd.mel_filterbank(n_mels)
        assert fb.shape == (n_mels, 257) and fb.dtype == torch.float32
        assert (fb >= 0).all() and (fb <= 1 + 1e-6).all()
        f = np.arange(257) * 16000 / 512
        centres = 700 * (10 ** (np.linspace(0, 2595 * np.log10(1 + 8000 / 700), n_mels + 2) / 2595) - 1)
        for i, row in enumerate(fb.numpy()):
            nz = np.flatnonzero(row)
            assert len(nz) >= 1 and np.all(np.diff(nz) == 1), "support must be one contiguous run"
            peak = nz[0] + int(np.argmax(row[nz]))
            assert np.all(np.diff(row[nz[0]:peak + 1]) >= 0) and np.all(np.diff(row[peak:nz[-1] + 1]) <= 0)
            # linear sides: the value at each bin is the HTK triangle evaluated there
            lo, c, hi = centres[i:i + 3]
            expect = np.clip(np.minimum((f - lo) / (c - lo), (hi - f) / (hi - c)), 0, None)
            np.testing.assert_allclose(row, expect, atol=1e-6)
        col = fb.sum(0).numpy()
        inner = (f >= centres[1]) & (f <= centres[-2])
        np.testing.assert_allclose(col[inner], 1.0, atol=1e-5)
        assert np.all(col <= 1 + 1e-5)
        assert (fb.sum(1) > 0).all()
        # row sums (widths in bins) grow with frequency
        assert fb.sum(1)[-1] > 5 * fb.sum(1)[0]


def test_nested_mel_filterbank_covers_the_spectrum_at_every_prefix():
    """What the VAD CRNN's bank is for: dcopt keeps a prefix of its rows. Every prefix of
    the nested bank sees every bin but the Nyquist one (where all triangles end); the same
    prefix of narrow mel bands in spread order leaves gaps. The last rows are the narrow
    bands themselves, and each row is a triangle peaking at its own mel centre."""
    import dcopt

    n = 80
    nested = sd.nested_mel_filterbank(n)
    narrow = sd.mel_filterbank(n)[dcopt.spread_order(n)]
    assert nested.shape == (n, 257) and (nested >= 0).all() and (nested <= 1 + 1e-6).all()
    for k in range(1, n + 1):
        assert int((nested[:k].sum(0) > 0).sum()) == 256, k
    assert int((narrow[:24].sum(0) > 0).sum()) < 160
    assert int((narrow[:24].sum(0) > 0).sum()) == 127     # the figure README and dcopt.spread_reach cite
    assert (nested.argmax(1) - narrow.argmax(1)).abs().max() <= 1   # the centre falls between two bins
    last = [j for j, r in enumerate(dcopt.spread_reach(n)) if r == 1]
    torch.testing.assert_close(nested[last], narrow[last])


def test_power_spectrogram_shapes_and_parseval():
    x = torch.randn(3, 16000)
    p = sd.power_spectrogram(x)
    assert p.shape == (3, 257, 100) and p.dtype == torch.float32
    # Parseval for one frame: sum_k |X_k|^2 over the full 512-point FFT = 512 * sum(frame^2)
    frame = x[0, 160 * 7:160 * 7 + 400] * torch.hann_window(400, periodic=True)
    full = p[0, :, 7].double()
    total = full[0] + full[-1] + 2 * full[1:-1].sum()
    assert torch.isclose(total, 512 * (frame.double() ** 2).sum(), rtol=1e-4)
    # a 1 kHz tone lands in bin 1000 / 31.25 = 32
    t = np.arange(16000) / 16000
    assert int(sd.power_spectrogram(np.sin(2 * np.pi * 1000 * t))[:, 50].argmax()) == 32
    lm = sd.log_mel(x, n_mels=40)
    assert lm.shape == (3, 40, 100) and torch.isfinite(lm).all()
    # frame energies used for the labels use the same framing
    e = sd.frame_energy(x[0].numpy())
    assert len(e) == 100 and np.isclose(e[7], float((frame.double() ** 2).sum()), rtol=1e-4)


def test_resampler_is_accurate_and_antialiased():
    t = np.arange(2 * 22050) / 22050
    mid = slice(800, -800)
    for f in (200.0, 1000.0, 4000.0, 6500.0):
        y = sd.resample(np.sin(2 * np.pi * f * t), 22050, 16000)
        assert len(y) == 32000
        ref = np.sin(2 * np.pi * f * np.arange(32000) / 16000)
        assert np.max(np.abs(y[mid] - ref[mid])) < 1e-3, f
    for f in (9000.0, 10500.0):             # above the new Nyquist: must be removed, not aliased
        y = sd.resample(np.sin(2 * np.pi * f * t), 22050, 16000)
        assert 10 * np.log10(np.mean(y[mid] ** 2) / 0.5) < -60, f


def test_noise_types_and_snr_mixing():
    rng = np.random.default_rng(0)
    speech = sd.resample(np.random.default_rng(1).standard_normal(22050), 22050, 16000) * 0.1
    labels = (np.arange(100) % 3 != 0).astype(np.float32)       # 1/3 of the frames "silent"
    speech[np.repeat(labels < 0.5, 160)] = 0.0
    low_share = {}
    for kind in sd.NOISE_TYPES:
        noise = sd.make_noise(kind, 16000, rng)
        assert noise.shape == (16000,) and noise.dtype == np.float32 and np.isfinite(noise).all()
        assert np.isclose(np.sqrt(np.mean(noise.astype(np.float64) ** 2)), 1.0, rtol=1e-3)
        spec = np.abs(np.fft.rfft(noise)) ** 2
        low_share[kind] = spec[:500].sum() / spec.sum()            # share below 500 Hz
        for snr in (-5.0, 0.0, 7.5, 25.0, 40.0):
            mix, scaled = sd.mix_at_snr(speech, noise, snr, labels)
            assert abs(sd.measure_snr(speech, mix - speech, labels) - snr) < 0.5
            assert abs(sd.measure_snr(speech, scaled, labels) - snr) < 0.01
    assert low_share["white"] < low_share["pink"] < low_share["brown"]
    for seed in range(5):                     # hum: strongest component is a 50/60 Hz harmonic
        hum = np.abs(np.fft.rfft(sd.make_noise("hum", 16000, np.random.default_rng(seed)))) ** 2
        peak_hz = float(np.argmax(hum))       # 1 s of audio: bin k is k Hz
        assert any(abs(peak_hz / max(1, round(peak_hz / f0)) - f0) < 0.01 * f0 + 1 for f0 in (50, 60)), peak_hz


def test_snr_band():
    b = sd.snr_band(torch.tensor([-5.0, 4.9, 5.0, 14.9, 15.0, 24.9, 25.0, 40.0]))
    assert b.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert len(sd.SNR_BAND_NAMES) == 4


def test_split_by_voice_tables():
    names = {s: {v.name for v in sd.voices_for(s)} for s in ("train", "val", "test")}
    assert not (names["train"] & names["val"] or names["train"] & names["test"] or names["val"] & names["test"])
    assert set().union(*names.values()) == {v.name for v in sd.VOICES}
    assert len({v.name for v in sd.VOICES}) == len(sd.VOICES)
    langs = {s: {v.name.split("+")[0].split("-")[0] for v in sd.voices_for(s)} for s in names}
    assert len(set().union(*langs.values())) >= 15                  # many languages
    variants = {s: {v.name.partition("+")[2] for v in sd.voices_for(s)} for s in names}
    assert not (variants["train"] & variants["test"])                # test timbres unseen too
    for s in names:                                                  # every digit language everywhere
        assert {v.lang for v in sd.voices_for(s, "kws")} == set(sd.DIGIT_WORDS)


def test_synthetic_filterbank_dataset(tmp_path):
    d = sd.make_filterbank_dataset(300, seed=0, cache_dir=tmp_path, source="synthetic")
    assert d["inputs"].shape == (300, 257) and d["targets"].shape == (300, 32)
    assert (d["inputs"] >= 0).all() and torch.isfinite(d["inputs"]).all()
    torch.testing.assert_close(d["targets"], d["inputs"] @ sd.mel_filterbank(32).T)


def test_missing_espeak_gives_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert not sd.espeak_available()
    with pytest.raises(sd.EspeakNotFoundError, match="scripts/install_system_deps.sh"):
        sd.make_vad_dataset("train", seed=0, cache_dir=tmp_path, tiny=True)
    with pytest.raises(sd.EspeakNotFoundError, match="scripts/install_system_deps.sh"):
        sd.make_kws_dataset("test", seed=0, cache_dir=None, tiny=True)


# --------------------------------------------------------------------------- espeak-ng

@needs_espeak
def test_vad_tiny_shapes(vad_tiny):
    d = vad_tiny
    n, t = 8, 300
    assert d["features"].shape == (n, 40, t) and d["features"].dtype == torch.float32
    assert d["labels"].shape == (n, t) and d["labels"].dtype == torch.float32
    assert set(d["labels"].unique().tolist()) <= {0.0, 1.0}
    assert d["snr"].shape == (n,) and d["frame_snr"].shape == (n, t)
    assert d["voice"].dtype == torch.long and d["noise_type"].shape == (n,)
    assert torch.isfinite(d["features"]).all() and torch.isfinite(d["frame_snr"]).all()
    assert ((d["snr"] >= -5 - 0.5) & (d["snr"] <= 40 + 0.5)).all()
    frac = d["labels"].mean(1)                # every clip has speech and pauses, about half speech
    assert ((frac > 0.05) & (frac < 1.0)).all() and 0.3 < float(frac.mean()) < 0.85


@needs_espeak
def test_vad_labels_are_sensible():
    rng = np.random.default_rng(7)
    for i in range(3):
        ex = sd.make_vad_example(rng, "train", 3.0, snr_db=20.0)
        lab = ex["labels"] > 0.5
        e = sd.frame_energy(ex["clean"])
        assert lab.any() and (~lab).any()
        # speech frames carry far more clean energy than non-speech frames
        assert e[lab].mean() > 1000 * (e[~lab].mean() + 1e-20)
        em = sd.frame_energy(ex["audio"])
        assert np.median(em[lab]) > 3 * np.median(em[~lab])
        # the per-frame SNR is higher on speech frames
        assert ex["frame_snr"][lab].mean() > ex["frame_snr"][~lab].mean() + 20


@needs_espeak
@pytest.mark.parametrize("noise_type", sd.NOISE_TYPES)
def test_requested_snr_is_measured(noise_type):
    rng = np.random.default_rng(sd.NOISE_TYPES.index(noise_type))
    snr = float(rng.uniform(-5, 30))
    ex = sd.make_vad_example(rng, "val", 2.0, snr_db=snr, noise_type=noise_type)
    assert abs(ex["snr"] - snr) < 0.5
    assert abs(sd.measure_snr(ex["clean"], ex["audio"] - ex["clean"], ex["labels"]) - snr) < 0.5
    assert np.max(np.abs(ex["audio"])) <= 0.99 + 1e-6


@needs_espeak
def test_kws_tiny_shapes(kws_tiny):
    d = kws_tiny
    assert d["features"].shape == (20, 40, 100) and d["features"].dtype == torch.float32
    assert d["labels"].dtype == torch.int64 and torch.bincount(d["labels"], minlength=10).tolist() == [2] * 10
    assert d["snr"].shape == (20,) and torch.isfinite(d["features"]).all()
    for vi, li in zip(d["voice"].tolist(), d["language"].tolist()):
        assert sd.VOICES[vi].lang == d["languages"][li]


@needs_espeak
def test_datasets_use_only_their_split_voices(vad_tiny, kws_tiny, cache):
    kws_test = sd.make_kws_dataset("test", seed=0, cache_dir=cache, tiny=True)
    for d, split in ((vad_tiny, "train"), (kws_tiny, "train"), (kws_test, "test")):
        used = {d["voices"][i] for i in d["voice"].tolist()}
        assert used <= {v.name for v in sd.voices_for(split)}
    a = {kws_tiny["voices"][i] for i in kws_tiny["voice"].tolist()}
    b = {kws_test["voices"][i] for i in kws_test["voice"].tolist()}
    assert not (a & b)


@needs_espeak
def test_cache_returns_identical_data(vad_tiny, cache):
    files = list(Path(cache).glob("vad-train-*.pt"))
    assert len(files) == 1
    t0 = time.perf_counter()
    again = sd.make_vad_dataset("train", seed=0, cache_dir=cache, tiny=True)
    assert time.perf_counter() - t0 < 1.0
    for k in ("features", "labels", "snr", "frame_snr", "voice", "noise_type"):
        assert torch.equal(again[k], vad_tiny[k]), k
    # regenerating without the cache is deterministic too
    fresh = sd.make_vad_dataset("train", n_clips=3, seed=0, cache_dir=None, tiny=True)
    torch.testing.assert_close(fresh["features"], vad_tiny["features"][:3], rtol=0, atol=1e-5)
    assert torch.equal(fresh["labels"], vad_tiny["labels"][:3])
    other = sd.make_vad_dataset("train", n_clips=3, seed=1, cache_dir=None)
    assert not torch.equal(other["labels"], fresh["labels"])


@needs_espeak
def test_speech_filterbank_dataset(cache):
    d = sd.make_filterbank_dataset(400, seed=0, cache_dir=cache, frames_per_clip=100)
    assert d["inputs"].shape == (400, 257) and d["targets"].shape == (400, 32)
    assert d["inputs"].dtype == torch.float32 and (d["inputs"] >= 0).all()
    torch.testing.assert_close(d["targets"], d["inputs"] @ sd.mel_filterbank(32).T)
    assert torch.equal(d["filterbank"], sd.mel_filterbank(32))
