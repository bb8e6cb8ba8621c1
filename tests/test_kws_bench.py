"""The spoken-keywords benchmark (benchmarks/kws.py, issue 6 section 3): its model is what
the benchmark claims (every residual stack a dynamic coupled group, exact export), and
its --tiny run writes the json / md / png with every run of the plan."""
from __future__ import annotations

import json

import pytest
import torch

import dcopt
from benchmarks import kws
from benchmarks.speech_data import espeak_available

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(widths=(32, 64, 128), kernel=9):
    torch.manual_seed(0)
    return kws.KWSResNet(widths, kernel=kernel)


def test_every_residual_stack_is_one_dynamic_group():
    model = _model()
    a = dcopt.analyze(model, (torch.randn(2, 40, 100),))
    assert not a.unsupported                              # nothing rejected (fc's output is merely fixed)
    by_producer = {p: g for g in a.groups for p in g.producers}
    # the stage groups: stem / projection, every block's second conv and the residual adds, coupled
    stage1 = by_producer["stem.0"]
    assert stage1 is by_producer["layers.0.conv2"] and stage1.status == "dynamic" and stage1.width == 32
    for stage, width in (("layers.1", 64), ("layers.2", 128)):
        g = by_producer[f"{stage}.conv2"]
        assert g is by_producer[f"{stage}.proj.0"] and g.status == "dynamic" and g.width == width
    # each block's inner width is its own dynamic group
    for block in ("layers.0", "layers.1", "layers.2"):
        assert by_producer[f"{block}.conv1"].status == "dynamic"
    assert by_producer["fc"].status == "fixed"          # the 10 classes stay
    assert len([g for g in a.groups if g.status == "dynamic"]) == 6
    assert a.dynamic_fraction == pytest.approx(1.0)


def test_convert_and_export_are_exact():
    model = _model(widths=(16, 24, 32))
    x = torch.randn(4, 40, 100)
    dm = dcopt.convert(model, (x[:2],), kappa_min=0.125)
    model.eval(), dm.eval()
    with torch.no_grad():
        assert torch.equal(dm(x), model(x))          # at full width the gated model is the model
        dm.set_sizes({n: max(1, info.width // 3 + i) for i, (n, info) in enumerate(dm.sizes().items())})
        small = dcopt.export(dm).eval()
        ref, out = dm(x), small(x)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    # MACs of the exported model (counted) = dcopt's complexity at the kept sizes (example batch of 2)
    assert dcopt.count_macs(small, (x[:2],)) == int(dm.complexity(at="kept").macs)
    assert dcopt.count_macs(small, (x[:1],)) < dcopt.count_macs(model, (x[:1],)) / 4
    assert all(not type(m).__module__.startswith("dcopt") for m in small.modules())


def test_batches_are_the_same_at_the_same_epoch_whatever_ran_before():
    x, y = torch.arange(20.0)[:, None], torch.arange(20)
    a = kws.Batches(x, y, 4, seed=3)
    list(a), list(a)
    b = kws.Batches(x, y, 4, seed=3, start_epoch=2)
    assert [t.tolist() for t, _ in a] == [t.tolist() for t, _ in b]
    assert sorted(v for t, _ in b for v in t.flatten().tolist()) == list(range(20))


@pytest.mark.skipif(not espeak_available(), reason="espeak-ng not installed (scripts/install_system_deps.sh)")
def test_tiny_run_writes_its_files(tmp_path):
    assert kws.main(["--tiny", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "kws.json").read_text())
    runs = [r["run"] for r in result["records"]]
    assert runs == kws.plan_names(kws.TINY)
    methods = {r["method"] for r in result["records"]}
    assert methods == {"full", "dcopt-kappa", "dcopt-budget", "static", "torch-pruning"}
    full = result["records"][0]
    for r in result["records"]:
        assert 0.0 <= r["metric"] <= 1.0 and r["macs"] > 0 and r["params"] > 0
        assert set(r["test_bands"]) == {"<5", "5-15", "15-25", ">=25"}
        assert r["macs"] <= full["macs"]
    assert {"full", "kmin-0.125", "budget-0.15"} <= set(result["histories"])
    assert result["partial"] is False and "verdicts" in result
    md = (tmp_path / "kws.md").read_text()
    assert "| run |" in md and "SNR band" in md
    assert (tmp_path / "kws.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --resume keeps what is there and runs nothing new
    assert kws.main(["--tiny", "--out", str(tmp_path), "--resume"]) == 0
    again = json.loads((tmp_path / "kws.json").read_text())
    assert [r["run"] for r in again["records"]] == runs
    # --report-only re-renders with the configuration the file was made with, not the defaults
    again["config"]["beta"] = 2.5
    (tmp_path / "kws.json").write_text(json.dumps(again))
    assert kws.main(["--tiny", "--out", str(tmp_path), "--report-only"]) == 0
    assert json.loads((tmp_path / "kws.json").read_text())["config"]["beta"] == 2.5
    assert "β 2.5" in (tmp_path / "kws.md").read_text()


def test_seed_summary_counts_wins_and_averages_the_gap():
    """Per dcopt run repeated on every seed: the seeds meeting the target, the wins over each
    baseline and the mean error difference to it."""
    def rec(run, method, metric, macs):
        return dict(run=run, method=method, metric=metric, macs=macs)

    table = {"full": {0: rec("full", "full", 0.06, 100), 1: rec("full", "full", 0.07, 100)},
             "budget-0.2": {0: rec("budget-0.2", "dcopt-budget", 0.065, 20),
                            1: rec("budget-0.2", "dcopt-budget", 0.09, 20)},
             "static@budget-0.2": {0: rec("static@budget-0.2", "static", 0.07, 20),
                                   1: rec("static@budget-0.2", "static", 0.08, 20)},
             "tp@budget-0.2": {0: rec("tp@budget-0.2", "torch-pruning", 0.06, 20)}}   # one seed only: skipped
    line, note = kws._seed_summary(table, [0, 1])
    assert "**budget-0.2**: 80.0–80.0 % fewer MACs, Δ +0.50 / +2.00 pp (mean +1.25)" in line
    assert "target on 1 of 2 seeds" in line
    # -0.5 and +1.0: mean +0.25, sd 1.06, t(1 df) 12.706 → ± 9.53
    # an interval containing 0 says how many seeds would tell the sign at this spread:
    # 1.96 · 1.0607 / √k < 0.25 first at k = 70 (t beyond 30 df taken as the normal's 1.96)
    assert "lower error than static on 1 of 2 (mean +0.25 ± 9.53 pp, sign at ≈ 70 seeds)" in line
    assert "Torch-Pruning" not in line
    assert "lower error than static at none; higher error than static at none" in note
    table["static@budget-0.2"][1]["metric"] = 0.1      # -0.5 and -1.0 pp: mean -0.75 ± 3.18, still not clear
    assert "lower error than static at none" in kws._seed_summary(table, [0, 1])[1]
    table["static@budget-0.2"][0]["metric"] = 0.076    # -1.1 and -1.0 pp: ± 0.64, clearly lower
    line, note = kws._seed_summary(table, [0, 1])
    assert "(mean -1.05 ± 0.64 pp)" in line and "lower error than static at budget-0.2;" in note


def test_seeds_to_tell_sign_is_the_first_count_whose_interval_excludes_zero():
    from benchmarks.speech_common import fmt_mean_interval, seeds_to_tell_sign
    assert seeds_to_tell_sign([1.0]) is None and seeds_to_tell_sign([1.0, -1.0]) is None
    assert seeds_to_tell_sign([1.0, 1.0]) == 2                     # no spread: any two seeds
    # mean 0.3, sd 0.4637: 2.262 · 0.4637 / √10 = 0.332 ≥ 0.3, 2.228 · 0.4637 / √11 = 0.3115 ≥ 0.3,
    # 2.201 · 0.4637 / √12 = 0.2946 < 0.3 (t quantiles for 9, 10, 11 degrees of freedom)
    assert seeds_to_tell_sign([0.6, 0.1, 0.9, 0.2, -0.3]) == 12
    assert seeds_to_tell_sign([5.0, -4.9]) == 1001 and fmt_mean_interval([5.0, -4.9], plan=True).endswith(
        "sign at > 1000 seeds")
    assert "sign at" not in fmt_mean_interval([1.0, 1.1], plan=True)   # already excludes 0


def test_the_fixed_phase_cache_is_keyed_by_the_data_too(tmp_path):
    """Same configuration and seed, other training data: a cached fixed phase must not be
    reused (a replicate seed once loaded one trained on another draw of the data)."""
    def data(seed):
        g = torch.Generator().manual_seed(seed)
        split = lambda n: dict(x=torch.randn(n, kws.N_MELS, kws.N_FRAMES, generator=g),  # noqa: E731
                               y=torch.randint(0, kws.N_CLASSES, (n,), generator=g), snr=torch.zeros(n))
        return dict(train=split(16), val=split(8), test=split(8))

    p = dict(kws.TINY)
    a = kws.fixed_phase(p, data(0), tmp_path)
    b = kws.fixed_phase(p, data(1), tmp_path)
    assert len(list(tmp_path.glob("kws-bench-fixed-*.pt"))) == 2
    assert a["history"] != b["history"]
    assert kws.fixed_phase(p, data(0), tmp_path)["history"] == a["history"]   # and reused for the same data


@pytest.mark.parametrize("overrides, drawn_with", [([], 0), (["seed=3"], 0), (["data_seed=3"], 3),
                                                   (["seed=2", "data_seed=5"], 5)])
def test_the_training_seed_keeps_the_data_and_data_seed_draws_others(monkeypatch, tmp_path, overrides, drawn_with):
    """``--set seed=N`` once drew other data as well; now only ``data_seed`` does."""
    seen = []

    class Drawn(Exception):
        pass

    def load_data(tiny, n_per_class=None, seed=0):
        seen.append(seed)
        raise Drawn

    monkeypatch.setattr(kws, "load_data", load_data)
    with pytest.raises(Drawn):
        kws.main(["--tiny", "--out", str(tmp_path), "--set", *overrides] if overrides
                 else ["--tiny", "--out", str(tmp_path)])
    assert seen == [drawn_with]
