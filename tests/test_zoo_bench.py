"""benchmarks/zoo.py on one small model (the full run is by hand): it records an exact
round trip, which shape propagation the analysis took and that it matched the real run,
the export with BatchNorm folded, and the markdown summary counts them. Torch-Pruning is left out (it runs in a child)."""
import json

import pytest

from benchmarks import zoo

pytestmark = pytest.mark.usefixtures("one_thread")


def test_zoo_one_model_writes_its_record_and_summary(tmp_path):
    zoo.main(["--models", "mnasnet0_5", "--no-torch-pruning", "--out", str(tmp_path)])
    records = json.loads((tmp_path / "zoo.json").read_text())
    assert [r["model"] for r in records] == ["mnasnet0_5"]
    rec = records[0]
    assert rec["outcome"] == "exact", rec
    assert rec["shape_propagation"] == "shapes only" and rec["shapes_match_real"] is True
    assert rec["macs_after"] == rec["macs_predicted"] and rec["macs_after"] < rec["macs"]
    assert rec["rel_error"] <= 1e-4 and rec["dynamic_fraction"] >= 0.5
    assert rec["fold_rel_error"] <= 1e-4 and 0 < rec["batchnorms_folded"] == rec["batchnorms"]
    md = (tmp_path / "zoo.md").read_text()
    assert md.startswith("1 models: exact 1; exact with ≥ 50 % of MACs dynamic: 1")
    assert "shapes-only run on 1 of 1 checked models; same shapes, dtypes and MACs as the real run on 1 of 1" in md
    assert f"exact on 1 of 1 models with BatchNorm; {rec['batchnorms']} of {rec['batchnorms']} BatchNorms folded" in md
