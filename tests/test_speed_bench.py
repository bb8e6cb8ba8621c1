"""benchmarks/speed.py --tiny writes its three files with the documented structure.
No timing is asserted here: timings belong in the benchmark's results, never in tests."""
import json

from benchmarks import speed


def test_speed_benchmark_tiny_run_writes_its_files(tmp_path):
    assert speed.main(["--tiny", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "speed.json").read_text())
    assert result["tiny"] is True
    assert result["meta"]["threads"] >= 1
    assert set(result["load"]) == set(speed.SECTIONS)
    for section in result["load"].values():
        assert len(section["before"]) == 3 and len(section["after"]) == 3
    assert {r["model"] for r in result["overhead"]} == {"crnn", "resnet18"}
    for r in result["overhead"]:
        assert r["original_s"] > 0 and r["dynamic_s"] > 0 and r["ratio"] > 0
        assert len(r["times"]["original"]) == len(r["times"]["dynamic"]) == r["repeats"]
    keys = {(r["model"], r["target"], r["round_to"], r["deploy"]) for r in result["latency"]}
    ways = {"crnn_b1": ("plain", "fold"), "resnet18": ("plain", "fold", "fold+cl")}   # channels_last: 4-D only
    assert keys == {(m, t, k, d) for m in ways for t in (0.5, 0.25) for k in (1, 8) for d in ways[m]}
    for r in result["latency"]:
        assert 0 < r["macs_fraction"] <= 1 and r["latency_ratio"] > 0
        assert set(r["full_deployed_over_original"]) == set(ways[r["model"]])
        assert r["exported_over_twin"] is None or r["deploy"] == "plain"
        if r["round_to"] == 8:
            assert all(w % 8 == 0 for w in r["kept_widths"])
    assert [(r["model"], r["deploy"]) for r in result["profile"]] == \
        [("resnet18", "plain"), ("resnet18", "fold+cl"), ("crnn_b1", "plain")]
    for r in result["profile"]:
        assert 0 < r["macs_fraction"] <= 1 and r["time_ratio"] > 0
        assert abs(sum(f["share_of_full"] for f in r["families"].values()) - 1) < 1e-3  # shares rounded in the JSON
    for s in result["scaling"]:
        assert s["kind"] in ("mlp", "conv") and len(s["points"]) == 3
        assert set(s["slope"]) == {"analyze", "convert", "export"}
        assert all(q["nodes"] > 0 and q["analyze"] > 0 for q in s["points"])
    (m,) = result["memory"]
    assert m["param_bytes"] > 0 and m["peak_total"] >= m["peak_convert"] > 0
    md = (tmp_path / "speed.md").read_text()
    for heading in ("## 1.", "## 2.", "## 2b.", "## 3.", "## 4."):
        assert heading in md
    assert (tmp_path / "speed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Target met, per model and way of running" in md
    # --report-only re-renders the same report from the JSON, with the current notes
    (tmp_path / "speed.md").unlink()
    assert speed.main(["--report-only", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "speed.md").read_text() == md
    assert json.loads((tmp_path / "speed.json").read_text()) == result
