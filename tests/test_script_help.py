"""Every runnable script answers ``--help`` with its usage and exit status 0.

argparse %-formats help texts, so a run name such as ``tol-1%`` in a help string made
``benchmarks/vad.py --help`` crash with a ValueError; a script without a parser would
start its (hour-long) job instead of printing usage."""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.relative_to(ROOT).as_posix()
                 for p in [*ROOT.glob("benchmarks/*.py"), *ROOT.glob("examples/*.py")]
                 if "__main__" in p.read_text() and "argparse" in p.read_text())


def test_the_scripts_with_a_command_line_are_all_found():
    assert {"benchmarks/vad.py", "benchmarks/kws.py", "benchmarks/speed.py", "benchmarks/zoo.py",
            "benchmarks/filterbank.py", "benchmarks/analyze_speed.py", "examples/quickstart.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_usage_and_exits_0(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    monkeypatch.setattr(sys, "path", [str(ROOT / Path(script).parent), *sys.path])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    assert stop.value.code == 0
    assert "usage:" in capsys.readouterr().out
