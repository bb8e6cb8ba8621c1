"""The `dcopt` command line: analyze, check, export; exit codes; one-line errors; and
dcopt.testing.assert_convertible.

Subprocess runs cost a torch import each (~3 s on a small CI machine), so they are all
started at once in a thread pool when the module begins (``cli_runs``) and the
in-process tests run while they finish; the subprocess tests are at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch import nn

import dcopt
from dcopt.cli import EXIT_ERROR, EXIT_FAIL, EXIT_OK, _gh_escape, build_parser, main
from dcopt.targets import load_target
from dcopt.testing import assert_convertible, check_failures

ROOT = Path(__file__).resolve().parents[1]
CRNN = "examples/crnn_speech.py"
UNSAFE = "examples/unsafe_fanin.py"


def line_of(path, text) -> int:
    with open(ROOT / path if not os.path.isabs(path) else path) as f:
        return next(i for i, line in enumerate(f, 1) if text in line)


CUMSUM_LINE = line_of(UNSAFE, "torch.cumsum(")

# ----------------------------------------------------------------------------- model files

BAD_FILES = {
    "syntax.py": """
        import torch

        def build_model(:
            return None
    """,
    "nomodel.py": """
        import torch
        from torch import nn

        class Net(nn.Module):
            def forward(self, x):
                return x
    """,
    "shape.py": """
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(8, 4)

            def forward(self, x):
                return self.fc(x)

        model = Net()

        def example_inputs():
            return (torch.randn(2, 5),)
    """,
    "untraceable.py": """
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(8, 4)

            def forward(self, x):
                if x.sum() > 0:
                    return self.fc(x)
                return self.fc(-x)

        model = Net()

        def example_inputs():
            return (torch.randn(2, 8),)
    """,
    "notconv.py": """
        import torch
        from torch import nn

        def build_model():
            return nn.Sequential(nn.Linear(8, 4))

        def example_inputs():
            return (torch.randn(2, 8),)
    """,
    "masked.py": """
        import torch
        from torch import nn

        class Masked(nn.Module):
            def __init__(self):
                super().__init__()
                self.emb = nn.Embedding(10, 16)
                self.fc1 = nn.Linear(16, 32)
                self.fc2 = nn.Linear(32, 4)

            def forward(self, ids, mask=None):
                h = self.emb(ids)
                if mask is not None:
                    h = h * mask.unsqueeze(-1)
                return self.fc2(torch.relu(self.fc1(h)))

        model = Masked()

        def example_inputs():
            return (torch.zeros(2, 5, dtype=torch.long),)
    """,
    "small_cnn.py": """
        import torch
        from torch import nn

        def build_model():
            return nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 4),
            )

        def example_inputs():
            return (torch.randn(2, 3, 8, 8),)
    """,
}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("targets")
    out = {}
    for name, body in BAD_FILES.items():
        (folder / name).write_text(textwrap.dedent(body))
        out[name] = str(folder / name)
    out["missing.py"] = str(folder / "missing.py")
    return out


@pytest.fixture(scope="module")
def checkpoint(files, tmp_path_factory) -> dict:
    """A trained-looking DynamicModel state: sizes set below N, weights perturbed."""
    target = load_target(files["small_cnn.py"])
    dm = dcopt.convert(target.model, target.example_inputs)
    dm.set_sizes({name: max(1, info.width // 2) for name, info in dm.sizes().items()})
    with torch.no_grad():
        for p in dm.weight_parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("ckpt") / "dyn.pt"
    torch.save(dm.state_dict(), path)
    dm.eval()
    with torch.no_grad():
        expected = dm(*target.example_inputs)
    return dict(path=str(path), inputs=target.example_inputs, expected=expected,
                params=sum(p.numel() for p in target.model.parameters()))


# ----------------------------------------------------------------------------- subprocesses

def _run(args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               COLUMNS="160", PYTHONWARNINGS="")
    return subprocess.run([sys.executable, "-m", "dcopt.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module", autouse=True)
def cli_runs(files, checkpoint, tmp_path_factory):
    """Start every subprocess run now; tests collect results with ``cli_runs[key]``."""
    export_dir = tmp_path_factory.mktemp("export") / "out"
    jobs = {
        "analyze_resnet18": ["analyze", "torchvision:resnet18"],
        "analyze_crnn": ["analyze", CRNN],
        "check_json": ["check", "--json", CRNN],
        "check_strict": ["check", "--strict", UNSAFE],
        "check_github": ["check", "--strict", "--format", "github", UNSAFE],
        "export": ["export", files["small_cnn.py"], "--checkpoint", checkpoint["path"], "-o", str(export_dir)],
        "bad_missing": ["analyze", files["missing.py"]],
        "bad_syntax": ["analyze", files["syntax.py"]],
        "bad_nomodel": ["check", files["nomodel.py"]],
        "bad_shape": ["check", files["shape.py"]],
        "bad_untraceable": ["analyze", files["untraceable.py"]],
        "debug": ["analyze", "--debug", files["syntax.py"]],
    }
    pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2))
    futures = {key: pool.submit(_run, args) for key, args in jobs.items()}

    class Runs(dict):
        export_dir = None

        def __getitem__(self, key):
            return futures[key].result()

    runs = Runs()
    runs.export_dir = export_dir
    yield runs
    pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- in process

@pytest.fixture
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def run_main(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_check_exit_codes_in_process(capsys, at_root, files):
    assert run_main(capsys, "check", files["small_cnn.py"])[0] == EXIT_OK
    assert run_main(capsys, "check", "--min-dynamic", "0.5", files["small_cnn.py"])[0] == EXIT_OK
    assert run_main(capsys, "check", "--min-dynamic", "50%", UNSAFE)[0] == EXIT_FAIL
    code, out, _ = run_main(capsys, "check", files["notconv.py"])
    assert code == EXIT_FAIL and "not convertible" in out


def test_check_without_strict_passes_but_notes_the_rejection(capsys, at_root):
    code, out, err = run_main(capsys, "check", UNSAFE)
    assert code == EXIT_OK and err == ""
    assert out.startswith(f"PASS {UNSAFE}")
    assert f"note: {UNSAFE}:{CUMSUM_LINE}: cumsum" in out


def test_check_several_targets_reports_all_and_errors_dominate(capsys, at_root, files):
    code, out, err = run_main(capsys, "check", UNSAFE, files["missing.py"], files["notconv.py"])
    assert code == EXIT_ERROR
    assert err.strip() == f"dcopt: error: file not found: {files['missing.py']}"
    assert f"PASS {UNSAFE}" in out and f"FAIL {files['notconv.py']}" in out
    assert "1 of 3 target(s) passed" in out


def test_check_json_reports_load_errors(capsys, at_root, files):
    code, out, err = run_main(capsys, "check", "--json", UNSAFE, files["syntax.py"])
    result = json.loads(out)
    assert code == EXIT_ERROR and result["exit_code"] == EXIT_ERROR and result["ok"] is False
    ok, bad = result["targets"]
    assert ok["ok"] and ok["analysis"]["convertible"]
    assert bad["error"].startswith("syntax error in") and len(err.strip().splitlines()) == 1


def test_check_json_keeps_stdout_clean_when_the_model_prints(capsys, tmp_path):
    path = tmp_path / "chatty.py"
    path.write_text(textwrap.dedent("""
        import torch
        from torch import nn
        print("building the model")
        def build_model():
            return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        def example_inputs():
            return (torch.randn(1, 4),)
    """))
    code, out, err = run_main(capsys, "check", "--json", str(path))
    assert code == EXIT_OK and json.loads(out)["ok"] and "building the model" in err


def test_analyze_json_matches_analyze(capsys, at_root):
    code, out, _ = run_main(capsys, "analyze", "--json", UNSAFE)
    t = load_target(UNSAFE)
    expected = json.loads(json.dumps(dcopt.analyze(t.model, t.example_inputs).to_dict(), default=str))
    assert code == EXIT_OK and json.loads(out) == expected


def test_analyze_report_lists_rejection_and_verdict(capsys, at_root):
    code, out, err = run_main(capsys, "analyze", UNSAFE)
    assert code == EXIT_OK and err == ""
    assert "cumsum" in out and f"unsafe_fanin.py:{CUMSUM_LINE}" in out
    assert "convertible" in out and "--strict" in out


def test_github_annotations_for_load_errors_and_failures(capsys, at_root, files):
    code, out, _ = run_main(capsys, "check", "--format", "github", files["notconv.py"], files["syntax.py"])
    assert code == EXIT_ERROR
    lines = [l for l in out.splitlines() if l.startswith("::")]
    assert any(l.startswith("::error file=") and "not convertible" in l for l in lines)
    assert any("syntax error in" in l for l in lines)


def test_gh_escape():
    assert _gh_escape("50% a\nb") == "50%25 a%0Ab"
    assert _gh_escape("C:/x,y", prop=True) == "C%3A/x%2Cy"


@pytest.mark.parametrize("argv, needle", [
    (["check"], "required: TARGET"),
    (["analyze", "x.py", "--input-shape", "1,a"], "bad input shape"),
    (["analyze", "x.py", "--input-shape", "0,16"], "positive integers"),
    (["analyze", "x.py", "--dtype", "float8"], "unknown dtype"),
    (["check", "--format", "xml", "x.py"], "invalid choice"),
    (["frobnicate"], "invalid choice"),
    # an unset $OUT: would write __init__.py into the working directory
    (["export", "x.py", "-c", "c.pt", "-o", ""], "empty output folder"),
    (["export", "x.py", "-c", "c.pt", "-o", " "], "empty output folder"),
    (["analyze", "x.py", "--concrete", "mask=none"], "--concrete"),
    (["analyze", "x.py", "--concrete", "mask"], "NAME=VALUE"),
])
def test_usage_errors_are_one_line(capsys, argv, needle):
    with pytest.raises(SystemExit) as info:
        main(argv)
    _, err = capsys.readouterr()
    assert info.value.code == EXIT_ERROR
    assert len(err.strip().splitlines()) == 1 and needle in err


def test_no_command(capsys):
    code, _, err = run_main(capsys)
    assert code == EXIT_ERROR and err.strip().startswith("dcopt: error: choose a command")


def test_main_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0
    for word in ("analyze", "check", "export", "examples:", "exit codes", "executed as Python",
                 "torchvision:NAME", "module:attr"):
        assert word in out


@pytest.mark.parametrize("command", ["analyze", "check", "export"])
def test_subcommand_help_has_examples_and_security_note(capsys, command):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0
    assert "examples:" in out and f"dcopt {command} " in out
    assert "executed as Python" in out and "TARGET forms" in out
    for option in ("--model", "--input-shape", "--dtype", "--debug", "--concrete"):
        assert option in out


def test_check_help_documents_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["check", "--help"])
    out = capsys.readouterr().out
    for option in ("--strict", "--min-dynamic", "--json", "--format"):
        assert option in out
    assert "exit codes" in out


def test_debug_works_before_and_after_the_command():
    parser = build_parser()
    assert parser.parse_args(["--debug", "check", "m.py"]).debug is True
    assert parser.parse_args(["check", "m.py", "--debug"]).debug is True
    assert parser.parse_args(["check", "m.py"]).debug is False


def test_export_checkpoint_errors(capsys, tmp_path, files):
    missing = run_main(capsys, "export", files["small_cnn.py"], "-c", str(tmp_path / "nope.pt"), "-o", str(tmp_path))
    assert missing[0] == EXIT_ERROR and "checkpoint not found" in missing[2]

    wrong = tmp_path / "wrong.pt"
    torch.save({"not.a.key": torch.zeros(1)}, wrong)
    code, _, err = run_main(capsys, "export", files["small_cnn.py"], "-c", str(wrong), "-o", str(tmp_path / "o"))
    assert code == EXIT_ERROR and "does not match the DynamicModel" in err and len(err.splitlines()) == 1

    pickled = tmp_path / "pickled.pt"
    torch.save(argparse.Namespace(a=1), pickled)     # needs unpickling code: refused by weights_only
    code, _, err = run_main(capsys, "export", files["small_cnn.py"], "-c", str(pickled), "-o", str(tmp_path / "o"))
    assert code == EXIT_ERROR and "weights_only=True" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()

    a_file = tmp_path / "taken"
    a_file.write_text("")
    code, _, err = run_main(capsys, "export", files["small_cnn.py"], "-c", str(wrong), "-o", str(a_file))
    assert code == EXIT_ERROR and "is a file" in err and "internal error" not in err


def test_export_output_path_problems_are_the_users_not_internal_errors(capsys, tmp_path, files, checkpoint):
    """An -o the OS refuses (below a file, a name too long, no such parent) is the user's
    path: one line naming it and the OS's reason, not "internal error ... please report it"."""
    a_file = tmp_path / "dyn.pt"
    a_file.write_text("")
    code, _, err = run_main(capsys, "export", files["small_cnn.py"], "-c", checkpoint["path"],
                            "-o", str(a_file / "sub"))
    assert code == EXIT_ERROR and "internal error" not in err and len(err.splitlines()) == 1
    assert f"{a_file} is a file" in err

    # found only when the folder is made, after loading and converting
    too_long = tmp_path / ("x" * 300) / "out"
    code, _, err = run_main(capsys, "export", files["small_cnn.py"], "-c", checkpoint["path"], "-o", str(too_long))
    assert code == EXIT_ERROR and "internal error" not in err and len(err.splitlines()) == 1
    assert err.startswith(f"dcopt: error: cannot write the exported model to -o {tmp_path}")


def test_export_takes_the_file_fit_checkpoints_to(capsys, tmp_path, files):
    """The file ``fit(..., checkpoint=FILE)`` writes holds the DynamicModel under "model";
    export reads the sizes training learned from it."""
    target = load_target(files["small_cnn.py"])
    dm = dcopt.convert(target.model, target.example_inputs, kappa_min=0.25, beta=20.0)
    x = target.example_inputs[0]
    data = [(torch.randn(8, 3, 8, 8), torch.randn(8, 4)) for _ in range(4)]
    ckpt = tmp_path / "run.ckpt"
    dcopt.fit(dm, data, nn.functional.mse_loss, fixed_epochs=1, optimize_epochs=3, lr=1e-2, size_lr=0.05,
              progress=False, checkpoint=ckpt)
    assert any(i.kept < i.width for i in dm.sizes().values())
    code, out, err = run_main(capsys, "export", files["small_cnn.py"], "-c", str(ckpt), "-o", str(tmp_path / "o"))
    assert code == EXIT_OK, err
    small = dcopt.load_exported(tmp_path / "o").eval()
    with torch.no_grad():
        assert torch.allclose(small(x), dm.eval()(x), atol=1e-5)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in target.model.parameters())


def test_export_keeps_the_widths_of_the_options_the_state_was_saved_under(capsys, tmp_path, files):
    """A state trained with round_to=8 and kappa_min=0.05 exports at the widths that model
    kept, not at what the defaults (round_to=1, kappa_min=0.125) would keep."""
    target = load_target(files["small_cnn.py"])
    dm = dcopt.convert(target.model, target.example_inputs, round_to=8, kappa_min=0.05)
    names = dm.group_names
    dm.set_sizes({names[0]: 3, names[1]: 1})   # kept 8 and 8 here; 3 and 2 (κ_min 0.125 of 12) by default
    ckpt = tmp_path / "dm.pt"
    torch.save(dm.state_dict(), ckpt)
    code, _, err = run_main(capsys, "export", files["small_cnn.py"], "-c", str(ckpt), "-o", str(tmp_path / "o"))
    assert code == EXIT_OK, err
    small = dcopt.load_exported(tmp_path / "o").eval()
    expected = dcopt.export(dm)
    widths = [m.out_channels for m in small.modules() if isinstance(m, nn.Conv2d)]
    assert widths == [m.out_channels for m in expected.modules() if isinstance(m, nn.Conv2d)] == [8, 8]


def test_export_fold_batchnorm_writes_a_model_without_batchnorm(capsys, tmp_path, files):
    target = load_target(files["small_cnn.py"])
    assert any(isinstance(m, nn.BatchNorm2d) for m in target.model.modules())
    dm = dcopt.convert(target.model, target.example_inputs)
    dm.set_sizes({n: 5 for n in dm.group_names})
    ckpt = tmp_path / "dm.pt"
    torch.save(dm.state_dict(), ckpt)
    code, out, err = run_main(capsys, "export", files["small_cnn.py"], "-c", str(ckpt), "-o", str(tmp_path / "o"),
                              "--fold-batchnorm")
    assert code == EXIT_OK, err
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in target.model.modules())
    assert f"BatchNorm folded into the layer before it: {n_bn} of {n_bn}\n" in out
    small = dcopt.load_exported(tmp_path / "o").eval()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in small.modules())
    x = target.example_inputs[0]
    with torch.no_grad():
        assert torch.allclose(small(x), dm.eval()(x), atol=1e-5)


@pytest.fixture
def sibling_project(tmp_path, monkeypatch):
    """a/net.py and b/net.py, each doing ``from dcopt_sib_layers import Block`` from its own
    folder: a's Block is convertible, b's (a cumsum over the features) is rejected."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    blocks = {"a": "self.l1(x).relu()", "b": "torch.cumsum(self.l1(x), -1)"}
    paths = {}
    for name, body in blocks.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "dcopt_sib_layers.py").write_text(textwrap.dedent(f"""
            import torch
            from torch import nn

            class Block(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.l1 = nn.Linear(16, 32)
                    self.l2 = nn.Linear(32, 16)

                def forward(self, x):
                    return self.l2({body})
        """))
        (tmp_path / name / "net.py").write_text(textwrap.dedent("""
            import torch
            from dcopt_sib_layers import Block
            model = Block()
            def example_inputs():
                return (torch.randn(2, 16),)
        """))
        paths[name] = str(tmp_path / name / "net.py")
    yield paths
    for mod in [m for m in sys.modules if m.startswith(("dcopt_sib_", "dcopt_target_"))]:
        del sys.modules[mod]


@pytest.mark.parametrize("order", ["ab", "ba"])
def test_check_gives_each_target_its_own_neighbour_modules(capsys, sibling_project, order):
    """The verdict of a target must not depend on the targets checked before it: b passed
    --strict after a (it was analysed with a's cached layers.py), and a failed after b,
    with an error in b/layers.py."""
    a, b = sibling_project["a"], sibling_project["b"]
    specs = [a, b] if order == "ab" else [b, a]
    code, out, err = run_main(capsys, "check", "--strict", *specs)
    assert code == EXIT_FAIL, (out, err)
    assert f"PASS {a}" in out and f"FAIL {b}" in out
    assert "cumsum" in out and os.path.join("a", "dcopt_sib_layers.py") not in out
    assert "dcopt_sib_layers" not in sys.modules


def test_concrete_fixes_a_forward_argument_the_inputs_leave_out(capsys, at_root, files):
    """``forward(self, ids, mask=None)`` with ``if mask is not None``: fx traces mask as an
    input, and the model then fails on a None it never saw. The error names the way out
    the command line has, and ``--concrete mask=None`` takes it."""
    code, out, err = run_main(capsys, "check", files["masked.py"])
    assert code == EXIT_ERROR and len(err.splitlines()) == 1
    assert "parameter mask=None got no value" in err and "--concrete mask=None" in err
    code, out, err = run_main(capsys, "check", "--concrete", "mask=None", files["masked.py"])
    assert code == EXIT_OK, err
    assert out.startswith(f"PASS {files['masked.py']}: 2 dynamic group(s)")
    code, _, err = run_main(capsys, "check", "--concrete", "mak=None", files["masked.py"])
    assert code == EXIT_ERROR and "has no parameter 'mak'" in err and "did you mean mask" in err


def test_export_with_concrete(capsys, tmp_path, files):
    """export converts with the same concrete_args, so a state trained from
    ``convert(model, inputs, concrete_args={"mask": None})`` loads and exports."""
    target = load_target(files["masked.py"], concrete_args={"mask": None})
    dm = dcopt.convert(target.model, target.example_inputs, concrete_args={"mask": None})
    dm.set_sizes({n: max(1, i.width // 2) for n, i in dm.sizes().items()})
    ckpt = tmp_path / "dm.pt"
    torch.save(dm.state_dict(), ckpt)
    code, out, err = run_main(capsys, "export", files["masked.py"], "-c", str(ckpt), "-o", str(tmp_path / "o"),
                              "--concrete", "mask=None")
    assert code == EXIT_OK, err
    assert "MACs" in out     # the original model's MACs, counted with the same concrete_args
    small = dcopt.load_exported(tmp_path / "o").eval()
    ids = target.example_inputs[0]
    with torch.no_grad():
        assert torch.allclose(small(ids), dm.eval()(ids), atol=1e-5)


# ----------------------------------------------------------------------------- dcopt.testing

def test_assert_convertible_passes_and_returns_the_analysis():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    a = assert_convertible(model, torch.randn(1, 4))           # a lone tensor is accepted
    assert a.convertible and check_failures(a) == []


def test_assert_convertible_fails_with_the_rejections(at_root):
    t = load_target(UNSAFE)
    assert_convertible(t.model, t.example_inputs)                # convertible: passes
    with pytest.raises(AssertionError) as info:
        assert_convertible(t.model, t.example_inputs, strict=True)
    msg = str(info.value)
    assert "rejected as unsupported" in msg and f"unsafe_fanin.py:{CUMSUM_LINE}" in msg and "cumsum" in msg
    with pytest.raises(AssertionError, match="below the required 50.0%"):
        assert_convertible(t.model, t.example_inputs, min_dynamic=0.5)


def test_assert_convertible_not_convertible():
    with pytest.raises(AssertionError, match="not convertible"):
        assert_convertible(nn.Sequential(nn.Linear(8, 4)), (torch.randn(2, 8),))


# ----------------------------------------------------------------------------- subprocess tests

def assert_one_line_error(result, *needles):
    assert result.returncode == EXIT_ERROR, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dcopt")
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_cli_analyze_resnet18_prints_the_table(cli_runs):
    r = cli_runs["analyze_resnet18"]
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    for word in ("Layers", "Groups", "DCL", "ACL", "layer4.1.conv1", "fc", "convertible", "1.81G"):
        assert word in r.stdout


def test_cli_analyze_crnn_prints_the_table(cli_runs):
    r = cli_runs["analyze_crnn"]
    assert r.returncode == 0, r.stderr
    for word in ("conv1", "bn1", "gru", "GRU", "head", "DCL", "ACL", "Groups", "convertible"):
        assert word in r.stdout


def test_cli_check_json_matches_analyze(cli_runs, at_root):
    r = cli_runs["check_json"]
    assert r.returncode == EXIT_OK, r.stderr
    result = json.loads(r.stdout)
    assert result["ok"] is True and result["exit_code"] == 0
    (entry,) = result["targets"]
    assert entry["target"] == CRNN and entry["ok"] and entry["failures"] == []
    t = load_target(CRNN)
    expected = json.loads(json.dumps(dcopt.analyze(t.model, t.example_inputs).to_dict(), default=str))
    assert entry["analysis"] == expected
    assert {"convertible", "macs", "params", "dynamic_macs", "dynamic_fraction", "roles", "groups",
            "rejections"} <= set(entry["analysis"])


def test_cli_check_strict_fails_with_file_line(cli_runs):
    r = cli_runs["check_strict"]
    assert r.returncode == EXIT_FAIL, (r.stdout, r.stderr)
    assert r.stdout.startswith(f"FAIL {UNSAFE}")
    assert f"{UNSAFE}:{CUMSUM_LINE}: cumsum" in r.stdout


def test_cli_check_github_annotations(cli_runs):
    r = cli_runs["check_github"]
    assert r.returncode == EXIT_FAIL
    assert f"::error file={UNSAFE},line={CUMSUM_LINE}," in r.stdout
    assert any(l.startswith("::error file=") and "rejected as unsupported" in l for l in r.stdout.splitlines())


def test_cli_export_writes_a_smaller_equivalent_model(cli_runs, checkpoint):
    r = cli_runs["export"]
    assert r.returncode == EXIT_OK, r.stderr
    out = Path(cli_runs.export_dir)
    assert (out / "__init__.py").exists() and (out / "weights.pt").exists()
    assert "params" in r.stdout and str(out) in r.stdout
    small = dcopt.load_exported(out)
    small.eval()
    with torch.no_grad():
        got = small(*checkpoint["inputs"])
    expected = checkpoint["expected"]
    assert (got - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max().item())
    assert sum(p.numel() for p in small.parameters()) < checkpoint["params"]


def test_cli_missing_file(cli_runs, files):
    assert_one_line_error(cli_runs["bad_missing"], "file not found", "missing.py")


def test_cli_syntax_error(cli_runs, files):
    assert_one_line_error(cli_runs["bad_syntax"], "syntax error in", f"syntax.py:{line_of(files['syntax.py'], 'def build_model(')}")


def test_cli_no_model(cli_runs):
    assert_one_line_error(cli_runs["bad_nomodel"], "no model found", "--model NAME")


def test_cli_wrong_input_shape(cli_runs, files):
    assert_one_line_error(cli_runs["bad_shape"], "forward failed on the example inputs (2x5 float32)",
                          f"shape.py:{line_of(files['shape.py'], 'return self.fc(x)')}")


def test_cli_untraceable_model(cli_runs, files):
    assert_one_line_error(cli_runs["bad_untraceable"], "torch.fx cannot trace",
                          f"untraceable.py:{line_of(files['untraceable.py'], 'if x.sum()')}")


def test_cli_debug_shows_the_traceback(cli_runs):
    r = cli_runs["debug"]
    assert r.returncode == EXIT_ERROR
    assert "Traceback" in r.stderr and r.stderr.strip().splitlines()[-1].startswith("dcopt: error: syntax error")


def test_a_reader_that_stops_early_is_not_a_failure():
    """``dcopt analyze ... | head -1``: rich exited with status 1 on the closed pipe, which
    reads as "not convertible"; an export printed "internal error (BrokenPipeError)"."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), COLUMNS="160")
    proc = subprocess.Popen([sys.executable, "-m", "dcopt.cli", "analyze", "torchvision:resnet18"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(timeout=300) == 141, err
    assert "internal error" not in err and "Traceback" not in err, err
