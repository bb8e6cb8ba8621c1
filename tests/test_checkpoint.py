"""fit(..., checkpoint=path): a run cut off after any epoch and resumed from its file ends
exactly where the uninterrupted run ends — weights, sizes, β and history — in κ, budget
and tolerance mode, with a shuffling DataLoader and with a GRU's recurrent noise; and a
checkpoint of another run is refused.

The cut is a ``KeyboardInterrupt`` raised by the data after a given number of batches,
what Ctrl-C does; the file left behind is the last finished epoch's.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dcopt
from dcopt.gates import GatedRNN
from dcopt.train import History, fit
from tests.models import CRNN, MLP   # MLP 16 → 32 → 24 → 4; CRNN (B, 20, T) → bidirectional 2-layer GRU → (B, T, 3)

pytestmark = pytest.mark.usefixtures("one_thread")


def mse(out, y):
    return nn.functional.mse_loss(out, y)


class Interrupt:
    """The batches of ``data``, re-iterable, raising KeyboardInterrupt once ``after``
    batches have been handed out over all epochs (None: never)."""

    def __init__(self, data, after=None):
        self.data, self.after, self.given = data, after, 0

    def __len__(self):
        return len(self.data)

    def __iter__(self):
        for b in self.data:
            if self.after is not None and self.given >= self.after:
                raise KeyboardInterrupt
            self.given += 1
            yield b


def _mlp_data(n=96, bs=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    y = torch.randn(n, 4, generator=g)
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]


def _run(dm, data, path=None, **kw):
    torch.manual_seed(123)
    return fit(dm, data, mse, progress=False, checkpoint=path, **kw)


def _same(dm_a, dm_b, ha: History, hb: History):
    sa, sb = dm_a.state_dict(), dm_b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if isinstance(sa[k], torch.Tensor):
            assert torch.equal(sa[k], sb[k]), k
    assert dm_a.kept_sizes() == dm_b.kept_sizes()
    da, db = ha.to_dict(), hb.to_dict()
    for r in da["epochs"] + db["epochs"]:
        r.pop("seconds")
    assert da == db


def _interrupted_then_resumed(make, data_fn, tmp_path, cut_after, **kw):
    """(uninterrupted dm, its history, resumed dm, its history)."""
    full = make()
    h_full = _run(full, Interrupt(data_fn()), **kw)
    path = tmp_path / "fit.ckpt"
    cut = make()
    with pytest.raises(KeyboardInterrupt):
        _run(cut, Interrupt(data_fn(), after=cut_after), path, **kw)
    assert path.exists()
    again = make()  # a new process would build the model afresh
    torch.manual_seed(999)  # whatever the generator's state: the checkpoint restores it
    h_again = fit(again, Interrupt(data_fn()), mse, progress=False, checkpoint=path, **kw)
    return full, h_full, again, h_again


SCHEDULE = dict(fixed_epochs=2, optimize_epochs=4, settle_epochs=2, lr=1e-2, size_lr=2e-2)


# 6 batches an epoch; cut inside: the 2nd fixed epoch, the 1st optimize epoch (the file
# ends the fixed phase), the 4th optimize epoch, the 2nd settle epoch
@pytest.mark.parametrize("cut_after", [6 + 3, 6 * 2 + 1, 6 * 5 + 2, 6 * 7 + 5])
def test_kappa_mode_resumes_exactly(tmp_path, cut_after):
    x = torch.randn(4, 16)

    def make():
        torch.manual_seed(0)
        return dcopt.convert(MLP(), (x,), kappa_min=0.25, beta=2.0)

    full, hf, again, ha = _interrupted_then_resumed(make, _mlp_data, tmp_path, cut_after, **SCHEDULE)
    _same(full, again, hf, ha)
    assert len(ha) == 8 and ha.final_sizes == hf.final_sizes
    assert any(ha.final_sizes[n] < w for n, w in ha.widths.items())  # the run did learn sizes


# cut in the 1st optimize epoch (the file ends the fixed phase: the resumed run reorders)
# and in the 3rd (the file holds the reordered model: it must not reorder again)
@pytest.mark.parametrize("cut_after", [6 * 2 + 1, 6 * 4 + 2])
def test_reorder_happens_once_across_a_resume(tmp_path, cut_after):
    x = torch.randn(4, 16)

    def make():
        torch.manual_seed(0)
        return dcopt.convert(MLP(), (x,), kappa_min=0.25, beta=2.0)

    full, hf, again, ha = _interrupted_then_resumed(make, _mlp_data, tmp_path, cut_after, reorder=True,
                                                    **SCHEDULE)
    _same(full, again, hf, ha)
    assert ha.reordered == hf.reordered and any(p != sorted(p) for p in hf.reordered["perms"].values())


def test_budget_mode_resumes_exactly_across_the_landing(tmp_path):
    x = torch.randn(4, 16)

    def make():
        torch.manual_seed(0)
        return dcopt.convert(MLP(), (x,), kappa_min=0.125, target_macs=0.4)

    # cut in the first settle epoch: the landing (end of the optimize phase) is in the file
    full, hf, again, ha = _interrupted_then_resumed(make, _mlp_data, tmp_path, 6 * 6 + 2, **SCHEDULE)
    _same(full, again, hf, ha)
    assert ha.budget_landing is not None and ha.budget_landing == hf.budget_landing
    assert float(again.beta) > 0


def test_tolerance_mode_resumes_exactly(tmp_path):
    x = torch.randn(4, 16)
    val = _mlp_data(n=32, seed=1)

    def make():
        torch.manual_seed(0)
        return dcopt.convert(MLP(), (x,), kappa_min=0.125, regularizer="macs")

    kw = dict(SCHEDULE, tolerance=0.05, val_data=val, size_lr=None, cross_epochs=2.0)
    full, hf, again, ha = _interrupted_then_resumed(make, _mlp_data, tmp_path, 6 * 4 + 3, **kw)
    _same(full, again, hf, ha)
    assert ha.reference_loss == hf.reference_loss is not None
    assert [r.loss_bound for r in ha.phase("optimize")] == [r.loss_bound for r in hf.phase("optimize")]


def test_tolerance_mode_without_val_data_restores_its_loss_average(tmp_path):
    x = torch.randn(4, 16)

    def make():
        torch.manual_seed(0)
        return dcopt.convert(MLP(), (x,), kappa_min=0.125, regularizer="macs")

    kw = dict(SCHEDULE, tolerance=0.05, size_lr=None, cross_epochs=2.0)
    full, hf, again, ha = _interrupted_then_resumed(make, _mlp_data, tmp_path, 6 * 4 + 3, **kw)
    _same(full, again, hf, ha)
    assert [r.constraint_loss for r in ha.phase("optimize")] == [r.constraint_loss for r in hf.phase("optimize")]


def test_shuffling_dataloader_and_gru_noise_resume_exactly(tmp_path):
    """A DataLoader with shuffle=True draws its order from torch's generator, which the
    checkpoint restores; the GRU's per-step noise needs its cached σ back too."""
    x = torch.randn(4, 20, 9)
    g = torch.Generator().manual_seed(3)
    xs, ys = torch.randn(48, 20, 9, generator=g), torch.randn(48, 9, 3, generator=g)

    def data():
        return DataLoader(TensorDataset(xs, ys), batch_size=8, shuffle=True)

    def make():
        torch.manual_seed(0)
        return dcopt.convert(CRNN(), (x,), kappa_min=0.25, beta=1.0)

    full, hf, again, ha = _interrupted_then_resumed(make, data, tmp_path, 6 * 3 + 4, **SCHEDULE)
    _same(full, again, hf, ha)
    gru = next(m for m in again.modules() if isinstance(m, GatedRNN))
    assert gru._sigmas.std  # the recurrent noise ran (its σ cache is what the file had to carry)


def test_a_finished_checkpoint_returns_its_history_without_training(tmp_path):
    x = torch.randn(4, 16)
    torch.manual_seed(0)
    dm = dcopt.convert(MLP(), (x,), kappa_min=0.25, beta=2.0)
    path = tmp_path / "fit.ckpt"
    h = _run(dm, _mlp_data(), path, **SCHEDULE)
    torch.manual_seed(0)
    dm2 = dcopt.convert(MLP(), (x,), kappa_min=0.25, beta=2.0)
    h2 = fit(dm2, Interrupt(_mlp_data(), after=0), mse, progress=False, checkpoint=path, **SCHEDULE)
    assert h2.to_dict()["epochs"] == h.to_dict()["epochs"] and h2.final_sizes == h.final_sizes
    assert dm2.kept_sizes() == dm.kept_sizes()
    assert torch.equal(dcopt.export(dm2).fc1.weight, dcopt.export(dm).fc1.weight)


def test_the_file_is_plain_data_read_without_executing_code(tmp_path):
    x = torch.randn(4, 16)
    dm = dcopt.convert(MLP(), (x,))
    path = tmp_path / "runs" / "a" / "fit.ckpt"   # its folder does not exist yet
    _run(dm, _mlp_data(), path, fixed_epochs=1, optimize_epochs=1)
    state = torch.load(path, weights_only=True)
    assert state["format"] == "dcopt-fit-checkpoint/1" and state["epoch"] == 2
    assert not list(path.parent.glob("*.tmp"))  # written under a temporary name, then renamed
    assert History.from_dict(state["history"]).to_dict() == state["history"]


def test_a_checkpoint_of_another_schedule_or_model_is_refused(tmp_path):
    x = torch.randn(4, 16)
    path = tmp_path / "fit.ckpt"
    dm = dcopt.convert(MLP(), (x,))
    _run(dm, _mlp_data(), path, fixed_epochs=1, optimize_epochs=1)
    with pytest.raises(ValueError, match=r"\(fixed, optimize, settle\) epochs = \(1, 1, 0\).*\(1, 2, 0\)"):
        _run(dcopt.convert(MLP(), (x,)), _mlp_data(), path, fixed_epochs=1, optimize_epochs=2)

    other = nn.Sequential(nn.Linear(16, 5), nn.ReLU(), nn.Linear(5, 4))   # other groups, same input
    with pytest.raises(ValueError, match="another model"):
        _run(dcopt.convert(other, (x,)), _mlp_data(), path, fixed_epochs=1, optimize_epochs=1)
    (tmp_path / "junk.pt").write_bytes(b"")
    torch.save({"x": 1}, tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="not a dcopt fit checkpoint"):
        _run(dcopt.convert(MLP(), (x,)), _mlp_data(), tmp_path / "junk.pt", fixed_epochs=1, optimize_epochs=1)


def test_the_users_model_is_untouched(tmp_path):
    x = torch.randn(4, 16)
    model = MLP()
    before = copy.deepcopy(model.state_dict())
    dm = dcopt.convert(model, (x,))
    _run(dm, _mlp_data(), tmp_path / "fit.ckpt", fixed_epochs=1, optimize_epochs=1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("where", ["empty", "directory"])
def test_a_path_that_cannot_hold_the_file_is_refused_before_training(tmp_path, where):
    """``checkpoint=""`` trained a whole epoch and then failed to write; a directory gave a
    raw IsADirectoryError."""
    torch.manual_seed(0)
    dm = dcopt.convert(MLP(), (torch.randn(4, 16),))
    before = copy.deepcopy(dm.state_dict())
    path = "" if where == "empty" else str(tmp_path)
    with pytest.raises(ValueError, match="checkpoint must be a file path"):
        _run(dm, _mlp_data(), path, fixed_epochs=1, optimize_epochs=1)
    assert all(torch.equal(v, before[k]) for k, v in dm.state_dict().items() if isinstance(v, torch.Tensor))
