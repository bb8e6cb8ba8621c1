"""benchmarks/zoo_compare.py: a changed result column is reported, timings are not."""
import json

from benchmarks.zoo_compare import compare, main


def _rec(model, **kw):
    return dict(dict(model=model, outcome="exact", macs=100, macs_after=40, macs_predicted=40, t_convert=0.1), **kw)


def test_only_result_columns_count(tmp_path):
    old = [_rec("a"), _rec("b"), _rec("c")]
    new = [_rec("a", t_convert=9.0), _rec("b", macs_after=41, macs_predicted=41), _rec("d")]
    common, diffs = compare(old, new)
    assert common == ["a", "b"]
    assert diffs == {"b": [("macs_after", 40, 41), ("macs_predicted", 40, 41)]}
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(json.dumps(new))
    assert main([str(tmp_path / "old.json"), str(tmp_path / "new.json")]) == 1
    assert "1 of them identical" in (tmp_path / "new-compare.md").read_text()
