"""Tolerance mode (GitHub issue 9): fit(..., tolerance=0.02) finds the smallest model within
2 % of the full model's loss, with β as a Lagrange multiplier nobody sets by hand.

* the controller (dcopt/tolerance.py): β grows with slack, holds in the band just above
  the bound, shrinks on violation, stays bounded, ignores one-epoch spikes (patience),
  asks for backtracking on a large persistent violation;
* fit: the option, its refusals, its history (reference, bound, per-group gradients),
  the fallback to the last feasible sizes;
* the planted 8-of-64 toy of tests/test_train.py ends within [8, 12] with either
  regularizer, without touching β;
* the filter-bank benchmark's --tiny run writes its json, md and png.

The toy here runs with batches of 16 (128 steps an epoch) instead of test_train's 64:
the weights need steps, not epochs, to move information out of a feature that is being
removed, and tolerance mode's default size speed is set per epoch (``cross_epochs``).
With 32 steps an epoch (test_train's batches of 64, lr 1e-2) the loss of the moving model
stays around a 2 % bound and the size crawls (measured: 64 → 26–29 in 30 epochs); with 128
(batches of 16, lr 3e-3) it reaches 8–9 in about 20 (measured on 4 seeds × 2
regularizers: kept 8–9, final val loss 13 % below the reference, the rank-limited model
overfitting less).
"""
from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from torch import nn

import dcopt
from dcopt.tolerance import LossAverage, ToleranceController, balance_beta
from dcopt.train import EpochRecord, _guard, fit
from test_train import KAPPA_MIN, RANK, batches, mlp_data, mse, planted_data, planted_model, tiny_dm


pytestmark = pytest.mark.usefixtures("one_thread")


# -- the controller -----------------------------------------------------------------------

def ctl(**kw):
    c = ToleranceController(0.02, **kw)
    c.set_reference(1.0)
    return c


def test_beta_starts_at_the_price_of_the_tolerance():
    c = ToleranceController(0.02, beta_init=2.0)
    assert c.beta is None
    with pytest.raises(RuntimeError, match="reference"):
        c.update(1.0)
    assert c.set_reference(0.5) == pytest.approx(2.0 * 0.02 * 0.5)
    assert c.bound == pytest.approx(1.02 * 0.5)
    assert c.slack(0.5) == pytest.approx(1.0) and c.slack(0.51) == pytest.approx(0.0)
    assert c.feasible(0.51) and not c.feasible(0.5101)


def test_beta_grows_with_slack_at_most_e_to_the_rate():
    c = ctl(rate=0.3, patience=0)
    b0 = c.beta
    assert c.update(1.0) == pytest.approx(b0 * math.exp(0.3))          # u = 1
    assert c.update(0.5) == pytest.approx(b0 * math.exp(0.6))          # u > 1 is clipped to 1
    b = c.beta
    assert c.update(1.01) == pytest.approx(b * math.exp(0.3 * 0.5))    # half the slack, half the step
    assert all(s.feasible and not s.backtrack for s in c.steps)


def test_start_boost_only_while_every_size_is_at_full_width():
    c = ctl(rate=0.3, patience=0, start_boost=3.0)
    b0 = c.beta
    assert c.update(1.0, full_width=True) == pytest.approx(b0 * math.exp(0.9))   # boosted
    b = c.beta
    assert c.update(1.0) == pytest.approx(b * math.exp(0.3))                     # a size moved: plain
    b = c.beta
    assert c.update(1.03, full_width=True) == pytest.approx(b)                   # in the hold band: no step
    plain = ctl(rate=0.3, patience=0)                                             # default: off
    assert plain.update(1.0, full_width=True) == pytest.approx(plain.steps[0].beta)
    assert plain.steps[0].log_step == pytest.approx(0.3)


def test_beta_holds_just_above_the_bound_and_shrinks_on_violation():
    c = ctl(rate=0.3, hold=1.0, patience=0)
    b = c.beta
    assert c.update(1.03) == pytest.approx(b)                          # u = -0.5: inside the hold band
    assert not c.steps[-1].feasible and c.steps[-1].log_step == 0.0
    assert c.update(1.05) == pytest.approx(b * math.exp(0.3 * -0.5))   # u = -1.5: shrink by the excess
    b = c.beta
    assert c.update(2.0) == pytest.approx(b * math.exp(-0.3 * 3.0))    # clipped at max_violation
    assert c.steps[-1].backtrack                                      # u = -49 < -2
    b = c.beta
    assert c.update(float("nan")) == pytest.approx(b * math.exp(-0.9))  # non-finite: the worst violation


def test_beta_stays_bounded():
    c = ctl()
    lo, hi = c.beta_bounds
    assert lo == pytest.approx(0.02 * 1e-3) and hi == pytest.approx(0.02 * 1e6)
    for _ in range(200):
        c.update(0.5)
    assert c.beta == pytest.approx(hi)
    for _ in range(200):
        c.update(10.0)
    assert c.beta == pytest.approx(lo)
    assert c.calibrate(1e12) == pytest.approx(hi)                      # calibration is clipped too


def test_patience_ignores_a_one_epoch_spike_but_not_a_persistent_violation():
    c = ctl(patience=1)
    c.update(1.0)
    b = c.beta
    c.update(1.5)                                  # spike: judged on min(1.0, 1.5) = 1.0
    assert c.beta > b and not c.steps[-1].backtrack and not c.steps[-1].feasible
    b = c.beta
    c.update(1.4)                                  # still violated: judged on 1.4
    assert c.beta < b and c.steps[-1].backtrack


def test_backtrack_cuts_beta_below_the_last_feasible_epochs_and_recovers():
    c = ctl(patience=0, rate=0.3, max_violation=3.0, recovery_epochs=2)
    c.update(1.0)                                  # feasible
    for _ in range(5):
        c.update(0.9)                              # β grows for 5 more feasible epochs...
    b_last = c.beta / math.exp(0.3)                # ...the last of them ran with this β
    c.update(1.5)                                  # overshoot: u = -24 → backtrack
    step = c.steps[-1]
    assert step.backtrack and step.recovering and not step.in_band
    assert c.beta == pytest.approx(b_last * math.exp(-0.9))
    b = c.beta
    c.update(1.5)                                  # 1st frozen epoch: β holds, no second backtrack
    assert c.beta == b and not c.steps[-1].backtrack and c.steps[-1].recovering
    c.update(1.5)                                  # 2nd frozen epoch: β holds, sizes move again next
    assert c.beta == b and not c.steps[-1].recovering
    c.update(1.5)                                  # the dual step (and a backtrack) again
    assert c.beta < b and c.steps[-1].backtrack
    c = ctl(patience=0, recovery_epochs=3)
    c.update(1.0)
    c.update(1.5)
    assert c.steps[-1].recovering
    c.update(1.0)                                  # feasible again: recovery ends at once, β grows
    assert not c.steps[-1].recovering and c.steps[-1].log_step > 0


def test_a_violation_beyond_the_hold_band_that_persists_backtracks_too():
    # bound 1.02, hold band up to 1.04, backtrack_slack -2 at 1.06: 1.05 is a moderate violation
    c = ctl(patience=0, persist=3, recovery_epochs=1)
    c.update(1.0)                                  # feasible
    for _ in range(2):
        c.update(1.05)                             # β shrinks; no backtrack yet
        assert c.steps[-1].log_step < 0 and not c.steps[-1].backtrack
    c.update(1.05)                                 # the 3rd in a row: the sizes overshot
    assert c.steps[-1].backtrack and c.steps[-1].recovering
    c.update(1.05)                                 # the recovery epoch does not count...
    assert not c.steps[-1].backtrack
    for _ in range(2):
        c.update(1.05)                             # ...the count starts afresh after it
        assert not c.steps[-1].backtrack
    c.update(1.05)
    assert c.steps[-1].backtrack
    c = ctl(patience=0, persist=3)
    for loss in [1.0] + [1.03] * 10:               # inside the hold band: β holds, never goes back
        c.update(loss)
    assert not any(s.backtrack for s in c.steps)
    c = ctl(patience=0, persist=0)                 # off: only the wide margin backtracks
    for loss in [1.0] + [1.05] * 10:
        c.update(loss)
    assert not any(s.backtrack for s in c.steps)


def test_backoff_slows_growth_after_each_backtrack():
    c = ctl(patience=0, rate=0.4, backoff=0.5, recovery_epochs=0)
    c.update(1.0)
    c.update(2.0)                                  # backtrack
    c.update(1.0)
    assert c.steps[-1].log_step == pytest.approx(0.2)
    c.update(2.0)
    c.update(1.0)
    assert c.steps[-1].log_step == pytest.approx(0.1)
    for _ in range(5):
        c.update(2.0)
        c.update(1.0)
    assert c.steps[-1].log_step == pytest.approx(0.4 / 8)     # never below rate/8


def test_calibrate_raises_beta_once():
    c = ctl()
    b = c.beta
    assert c.calibrate(b / 10) == b and c.calibrated        # never lowers β
    c = ctl()
    assert c.calibrate(float("inf")) == b and not c.calibrated  # no pull measured: try again later
    assert c.calibrate(3.0) == 3.0 and c.calibrated
    assert c.calibrate(30.0) == 3.0
    c = ctl()
    assert c.calibrate(0.0) == b and c.calibrated             # a size already moves: nothing to raise


def _rec(pull, std, push):
    return EpochRecord(phase="optimize", epoch=1, phase_epoch=1, train_loss=1.0, complexity_loss=0.0,
                       val_loss=None, metric=None, macs_fraction=1.0, params_fraction=1.0, beta=2.0, sizes={},
                       kappa={}, steps=1, seconds=0.0,
                       task_grad=pull, task_grad_std=std, complexity_grad=push)


def test_balance_beta_adds_a_share_of_the_pulls_spread():
    # at β = 2 the push is 0.5 per unit β: means balance at β = 0.1/0.5 = 0.2 for "a", 0.4 for "b"
    rec = _rec({"a": -0.1, "b": -0.2}, {"a": 4.0, "b": 0.0}, {"a": 1.0, "b": 1.0})
    assert balance_beta(rec, 2.0) == pytest.approx(0.2)
    # a spread of 4 per step: the net push must reach 0.25·4 = 1 before "a" moves usefully,
    # β = 1.1/0.5 = 2.2; "b" has no spread and now moves first, at 0.4
    assert balance_beta(rec, 2.0, noise=0.25) == pytest.approx(0.4)
    assert balance_beta(_rec({"a": -0.1}, {"a": 4.0}, {"a": 1.0}), 2.0, noise=0.25) == pytest.approx(2.2)
    # a task that itself pushes a size down: it moves at β = 0 already
    assert balance_beta(_rec({"a": 0.5}, {"a": 0.1}, {"a": 1.0}), 2.0, noise=0.25) == 0.0
    # nothing pushed (no complexity gradient): no balance
    assert balance_beta(_rec({"a": -0.1}, {"a": 1.0}, {"a": 0.0}), 2.0, noise=0.25) == math.inf


@pytest.mark.parametrize("kw, match", [
    (dict(tolerance=0.0), "tolerance"), (dict(tolerance=-0.1), "tolerance"), (dict(tolerance=True), "tolerance"),
    (dict(tolerance=0.02, rate=0), "rate"), (dict(tolerance=0.02, patience=1.5), "patience"),
    (dict(tolerance=0.02, hold=2.0, backtrack_slack=-1.0), "backtrack_slack"),
    (dict(tolerance=0.02, beta_range=(2.0, 10.0)), "beta_range"), (dict(tolerance=0.02, backoff=0.0), "backoff"),
    (dict(tolerance=0.02, recovery_epochs=-1), "recovery_epochs"),
    (dict(tolerance=0.02, start_boost=0.5), "start_boost"),
    (dict(tolerance=0.02, calibration_noise=-1.0), "calibration_noise"),
    (dict(tolerance=0.02, persist=-1), "persist"),
])
def test_controller_rejects_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        ToleranceController(**kw)
    with pytest.raises(ValueError, match="reference"):
        ToleranceController(0.02).set_reference(0.0)


def test_loss_average_is_bias_corrected():
    avg = LossAverage(halflife=4)
    assert avg.value is None
    avg.add(2.0)
    assert avg.value == pytest.approx(2.0)
    for _ in range(100):
        avg.add(1.0)
    assert avg.value == pytest.approx(1.0, abs=1e-6)


# -- fit ----------------------------------------------------------------------------------

def test_fit_refuses_tolerance_with_a_budget_and_bad_values():
    _, dm = tiny_dm(target_macs=0.5)
    with pytest.raises(ValueError, match="budget mode"):
        fit(dm, mlp_data(), mse, fixed_epochs=1, optimize_epochs=1, tolerance=0.02, progress=False)
    _, dm = tiny_dm()
    with pytest.raises(TypeError, match="tolerance"):
        fit(dm, mlp_data(), mse, fixed_epochs=1, optimize_epochs=1, tolerance="2%", progress=False)
    with pytest.raises(ValueError, match="tolerance"):
        fit(dm, mlp_data(), mse, fixed_epochs=1, optimize_epochs=1, tolerance=-0.02, progress=False)
    with pytest.raises(ValueError, match="cross_epochs"):
        fit(dm, mlp_data(), mse, fixed_epochs=1, optimize_epochs=1, tolerance=0.02, cross_epochs=0, progress=False)


def test_fit_tolerance_mode_history_and_defaults():
    _, dm = tiny_dm(beta=123.0)
    val = mlp_data(64, seed=1)
    hist = fit(dm, mlp_data(), mse, fixed_epochs=3, optimize_epochs=8, lr=3e-3, val_data=val, progress=False)
    assert hist.tolerance is None and hist.reference_loss is None                # β mode: unchanged
    assert [r.phase for r in hist.epochs].count("settle") == 0

    _, dm = tiny_dm(beta=123.0)
    hist = fit(dm, mlp_data(), mse, fixed_epochs=3, optimize_epochs=8, lr=3e-3, tolerance=0.05, val_data=val,
               progress=False)
    assert [r.phase for r in hist.epochs] == ["fixed"] * 3 + ["optimize"] * 8 + ["settle"] * 2  # 8 // 4
    assert hist.tolerance == 0.05
    assert hist.reference_loss == pytest.approx(sum(r.val_loss for r in hist.phase("fixed")) / 3)
    names = dm.group_names
    for r in hist.epochs:
        if r.phase == "optimize":
            assert r.loss_bound == pytest.approx(1.05 * hist.reference_loss)
            assert r.constraint_loss == r.val_loss
            assert list(r.task_grad) == names and list(r.complexity_grad) == names
            assert all(v > 0 for v in r.complexity_grad.values())               # the regularizer pushes down
            assert all(math.isfinite(v) for v in r.task_grad.values())
        else:
            assert r.loss_bound is None and r.task_grad == {} and not r.backtracked
    betas = [r.beta for r in hist.epochs]
    assert betas[0] == 123.0 and betas[3] != 123.0                              # the config's β is ignored
    assert betas[3] == pytest.approx(0.05 * hist.reference_loss)                # start: tol·ref
    assert len(set(betas[-2:])) == 1                                            # settle: β untouched
    d = json.loads(json.dumps(hist.to_dict()))
    assert d["reference_loss"] == hist.reference_loss and "task_grad" in d["epochs"][5]


def test_fit_without_val_data_uses_the_training_loss():
    _, dm = tiny_dm()
    hist = fit(dm, mlp_data(), mse, fixed_epochs=2, optimize_epochs=3, settle_epochs=0, lr=3e-3, tolerance=0.1,
               progress=False)
    assert hist.reference_loss is not None and hist.reference_loss > 0
    assert all(r.constraint_loss is not None and r.val_loss is None for r in hist.phase("optimize"))


def test_fit_with_a_controller_and_a_given_reference():
    _, dm = tiny_dm()
    c = ToleranceController(0.1, reference=5.0, rate=0.5)
    hist = fit(dm, mlp_data(), mse, fixed_epochs=0, optimize_epochs=2, settle_epochs=0, tolerance=c, progress=False)
    assert hist.reference_loss == 5.0 and len(c.steps) == 2
    assert hist.phase("optimize")[0].beta == pytest.approx(0.1 * 5.0)


def test_unconverged_fixed_phase_warns():
    _, dm = tiny_dm()
    with pytest.warns(RuntimeWarning, match="fixed_epochs"):
        fit(dm, mlp_data(), mse, fixed_epochs=6, optimize_epochs=1, settle_epochs=0, lr=1e-3, tolerance=0.001,
            val_data=mlp_data(64, seed=1), progress=False)


def test_reference_checks_warn_on_drift_and_on_jitter_only():
    from dcopt.train import _warn_unconverged

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _warn_unconverged([1.0, 1.0, 1.0, 1.0, 1.0, 1.0], 0.02)          # flat: nothing to say
        _warn_unconverged([2.0, 1.01, 1.008, 1.006, 1.004, 1.002, 1.0], 0.02)  # converged: last 6 within 1 %
        _warn_unconverged([1.0, 1.3], 0.02)                              # too few epochs to judge
    with pytest.warns(RuntimeWarning, match="still moved") as rec:
        _warn_unconverged([1.5, 1.4, 1.3, 1.2, 1.1, 1.0], 0.02)          # a steady fall: drift, no jitter
    assert not any("jitter" in str(w.message) for w in rec)
    with pytest.warns(RuntimeWarning, match="jitter") as rec:
        _warn_unconverged([0.28, 0.21, 0.24], 0.05)                      # the VAD fixed phase at lr 2e-3
    assert not any("still moved" in str(w.message) for w in rec)


def test_guard_falls_back_to_the_last_feasible_sizes():
    from dcopt.tolerance import ToleranceStep

    k = nn.Parameter(torch.tensor(0.5))
    opt = torch.optim.Adam([k], lr=0.1)
    k.grad = torch.tensor(1.0)
    opt.step()                                           # Adam now has moments for k
    step = dict(loss=1.0, judged=1.0, bound=1.02, slack=1.0, log_step=0.3, beta=1.0)
    ok = ToleranceStep(**step, feasible=True, backtrack=False)
    bad = ToleranceStep(**step, feasible=False, backtrack=False, in_band=False)
    band = ToleranceStep(**step, feasible=False, backtrack=False, in_band=True)
    worse = ToleranceStep(**step, feasible=False, backtrack=True)
    last_ok, did = _guard(ok, [k], [k.detach().clone()], opt, final=False)
    assert not did and float(last_ok[0]) == float(k.detach())
    with torch.no_grad():
        k.fill_(0.2)
    assert _guard(bad, [k], last_ok, opt, final=False)[1] is False and float(k.detach()) == pytest.approx(0.2)
    assert _guard(worse, [k], last_ok, opt, final=False)[1] is True
    assert float(k.detach()) == float(last_ok[0]) and k not in opt.state  # back, Adam's moments restarted
    with torch.no_grad():
        k.fill_(0.2)
    assert _guard(band, [k], last_ok, opt, final=True)[1] is False    # a transient may end the phase...
    assert _guard(bad, [k], last_ok, opt, final=True)[1] is True      # ...a worse violation may not
    assert float(k.detach()) == float(last_ok[0])


# -- planted 8-of-64 structure ------------------------------------------------------------

@pytest.mark.parametrize("regularizer", ["l2", "macs"])
def test_planted_rank_tolerance_mode_finds_the_structure(regularizer):
    train, val, example = planted_data()
    x, y = torch.cat([a for a, _ in train]), torch.cat([b for _, b in train])
    train = batches(x, y, 16)
    dm = dcopt.convert(planted_model(), (example,), regularizer=regularizer, kappa_min=KAPPA_MIN)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)      # the fixed phase has converged
        hist = fit(dm, train, mse, fixed_epochs=10, optimize_epochs=30, lr=3e-3, tolerance=0.02, val_data=val,
                   progress=False)
    kept = hist.last.sizes["0"]
    bound = hist.phase("optimize")[-1].loss_bound
    print(f"tolerance toy ({regularizer}): kept {kept}/64, val loss {hist.last.val_loss:.5f}, reference "
          f"{hist.reference_loss:.5f}, bound {bound:.5f}, backtracks {sum(r.backtracked for r in hist.epochs)}")
    assert RANK <= kept <= 12
    assert hist.last.val_loss <= bound
    assert dcopt.export(dm)[0].out_features == kept


# -- the benchmark ------------------------------------------------------------------------

@pytest.mark.skipif(not __import__("benchmarks.speech_data").speech_data.espeak_available(),
                    reason="espeak-ng not installed (scripts/install_system_deps.sh)")
def test_filterbank_benchmark_tiny_run_writes_its_files(tmp_path):
    from benchmarks import filterbank

    assert filterbank.main(["--tiny", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "filterbank.json").read_text())
    assert [(r["seed"], r["regularizer"]) for r in result["rows"]] == [(0, "l2"), (0, "macs")]
    for r in result["rows"]:
        assert 1 <= r["width"] <= 64 and r["test_l1"] > 0 and r["test_l1_full"] > 0
    assert set(result["histories"]) == {"0/l2", "0/macs"}
    assert "| seed |" in (tmp_path / "filterbank.md").read_text()
    assert (tmp_path / "filterbank.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
