"""benchmarks/rnn_pull.py: what removing a GRU unit costs, against what the noise sees."""
from __future__ import annotations

import json

import pytest
import torch

import dcopt
from benchmarks import rnn_pull, vad

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_true_rise_is_what_the_export_loses_and_the_noisy_ones_differ():
    """"true" must be the loss difference of two *exported* models (m and m + 1 GRU units),
    so the table compares the noise with real removal; with the noise at λ ≈ 0 the rises
    are estimates, not copies of it."""
    torch.manual_seed(0)
    p = dict(vad.TINY)
    model = vad.build(p).eval()
    x = torch.rand(6, 257, 30) * 3
    y = (torch.rand(6, 30) > 0.5).float()
    dm = dcopt.convert(model, (x[:2],)).optimize_sizes()
    rows = rnn_pull.loss_rises(dm, dict(x=x, y=y), [3, 5], draws=2)

    def exported_loss(m):
        dm.fix_sizes()
        dm.set_sizes({"gru": m})
        out = dcopt.export(dm).eval()
        dm.optimize_sizes()
        with torch.no_grad():
            return float(vad.bce(out(x), y))

    for r in rows:
        assert r["true"] == pytest.approx(exported_loss(r["unit"]) - exported_loss(r["unit"] + 1), abs=1e-5)
        assert r["output only"] != r["true"] and r["output + recurrence"] != r["output only"]


def test_tiny_run_writes_its_tables(tmp_path):
    assert rnn_pull.main(["--tiny", "--out", str(tmp_path), "--draws", "1"]) == 0
    res = json.loads((tmp_path / "rnn_pull.json").read_text())
    assert [r["unit"] for r in res["loss_rises"]] == list(range(1, res["hidden"]))
    assert all(set(r) >= {"unit", "true", *rnn_pull.SCHEMES} for r in res["loss_rises"])
    assert len(res["pulls"]) == 4 and all(r[n]["std"] >= 0 for r in res["pulls"] for n in rnn_pull.SCHEMES)
    assert (tmp_path / "rnn_pull.md").exists() and (tmp_path / "rnn_pull.png").exists()
