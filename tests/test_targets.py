"""Loading CLI targets (dcopt.targets): every form, every way it can go wrong, one line each."""
from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from torch import nn

from dcopt.errors import DcoptError
from dcopt.targets import (LoadedTarget, TargetError, describe_inputs, isolated_imports, load_target, make_inputs,
                           parse_concrete, parse_dtype, parse_shape)

MLP_SRC = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.fc1 = nn.Linear(4, width)
        self.fc2 = nn.Linear(width, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))
"""


def write(tmp_path, name, body, header=MLP_SRC):
    p = tmp_path / name
    p.write_text(textwrap.dedent(header) + textwrap.dedent(body))
    return str(p)


def line_of(path, text) -> int:
    """1-based number of the first line of ``path`` containing ``text``."""
    with open(path) as f:
        return next(i for i, line in enumerate(f, 1) if text in line)


def error_of(*args, **kwargs) -> str:
    with pytest.raises(TargetError) as info:
        load_target(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


# ----------------------------------------------------------------------------- parsing

@pytest.mark.parametrize("text, shape, dtype", [
    ("1,3,224,224", (1, 3, 224, 224), None),
    ("1x3x8", (1, 3, 8), None),
    ("(2, 16)", (2, 16), None),
    ("2,16:int64", (2, 16), torch.int64),
    ("4:bool", (4,), torch.bool),
])
def test_parse_shape(text, shape, dtype):
    assert parse_shape(text) == (shape, dtype)


@pytest.mark.parametrize("text", ["", "a", "1,x", "1,,3", "-1,2", "0,16", "1,3,0", "1,2:complex999"])
def test_parse_shape_rejects(text):
    with pytest.raises(ValueError):
        parse_shape(text)


def test_parse_dtype_aliases():
    assert parse_dtype("long") is torch.int64
    assert parse_dtype("torch.float16") is torch.float16
    assert parse_dtype("FP32") is torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_dtype("float8")


@pytest.mark.parametrize("text, expected", [
    ("mask=None", ("mask", None)),
    ("use_cache=False", ("use_cache", False)),
    (" steps = 3 ", ("steps", 3)),
    ("scale=-0.5", ("scale", -0.5)),
    ("mode='fast'", ("mode", "fast")),
])
def test_parse_concrete(text, expected):
    assert parse_concrete(text) == expected


@pytest.mark.parametrize("text", ["mask", "=None", "1x=None", "mask=none", "mask=fast", "mask=[1]",
                                  "mask=__import__('os')", "mask=1j", "mask="])
def test_parse_concrete_takes_only_plain_literals(text):
    """Literals only, read by ast.literal_eval: nothing that runs code, no container, and
    no bare word guessed as a string (``none`` is not None)."""
    with pytest.raises(ValueError, match="--concrete"):
        parse_concrete(text)


def test_make_inputs_dtypes_and_token_range():
    x, ids, mask = make_inputs([((2, 3), None), ((2, 5), torch.int64), ((2, 5), torch.bool)])
    assert x.dtype == torch.float32 and x.shape == (2, 3)
    assert ids.dtype == torch.int64 and set(ids.unique().tolist()) <= {0, 1}
    assert mask.dtype == torch.bool
    (y,) = make_inputs([(1, 4)], torch.float64)
    assert y.dtype == torch.float64
    assert describe_inputs((x, ids)) == "2x3 float32, 2x5 int64"


# ----------------------------------------------------------------------------- file targets

def test_file_with_model_instance_and_example_inputs(tmp_path):
    path = write(tmp_path, "m.py", """
        model = Net()
        def example_inputs():
            return (torch.randn(3, 4),)
    """)
    t = load_target(path)
    assert isinstance(t, LoadedTarget) and isinstance(t.model, nn.Module)
    assert t.example_inputs[0].shape == (3, 4)
    assert t.source == f"{path}:model" and t.path == path


@pytest.mark.parametrize("name", ["build_model", "get_model"])
def test_file_with_builder_function(tmp_path, name):
    path = write(tmp_path, "m.py", f"""
        def {name}():
            return Net(width=5)
        example_inputs = torch.randn(1, 4)      # a value works too, a lone tensor is wrapped
    """)
    t = load_target(path)
    assert t.model.fc1.out_features == 5
    assert t.source.endswith(f"{name}()")
    assert isinstance(t.example_inputs, tuple) and len(t.example_inputs) == 1


def test_model_option_class_and_file_colon_form(tmp_path):
    path = write(tmp_path, "m.py", "")
    t = load_target(path, model_name="Net", input_shapes=["2,4"])
    assert isinstance(t.model, nn.Module) and t.example_inputs[0].shape == (2, 4)
    t2 = load_target(f"{path}:Net", input_shapes=[(2, 4)])
    assert t2.source.endswith("Net()")


def test_input_shape_overrides_example_inputs_and_dtype_for_tokens(tmp_path):
    path = write(tmp_path, "lm.py", """
        class LM(nn.Module):
            def __init__(self):
                super().__init__()
                self.emb = nn.Embedding(10, 8)
                self.out = nn.Linear(8, 10)
            def forward(self, ids):
                return self.out(self.emb(ids))
        model = LM()
        def example_inputs():
            return (torch.zeros(1, 3, dtype=torch.long),)
    """)
    t = load_target(path, input_shapes=["2,7"], dtype="int64")
    assert t.example_inputs[0].dtype == torch.int64 and t.example_inputs[0].shape == (2, 7)


def test_file_can_import_its_neighbours(tmp_path):
    (tmp_path / "helper_mod_for_dcopt.py").write_text("WIDTH = 6\n")
    path = write(tmp_path, "m.py", """
        import helper_mod_for_dcopt
        def build_model():
            return Net(width=helper_mod_for_dcopt.WIDTH)
        def example_inputs():
            return (torch.randn(1, 4),)
    """)
    assert load_target(path).model.fc1.out_features == 6


@pytest.fixture
def clean_imports(monkeypatch):
    """sys.path and the test's helper modules as before, whatever the test (or a broken
    isolated_imports) left behind."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    for name in [m for m in sys.modules if m.startswith(("dcopt_sib_", "dcopt_target_"))]:
        del sys.modules[name]


def _sibling_project(tmp_path, name):
    """Two folders whose model files import a neighbour of the same name and different width."""
    paths = {}
    for folder, width in (("a", 5), ("b", 7)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / f"{name}.py").write_text(f"WIDTH = {width}\n")
        paths[folder] = write(tmp_path / folder, "net.py", f"""
            import {name}
            def build_model():
                return Net(width={name}.WIDTH)
            def example_inputs():
                return (torch.randn(1, 4),)
        """)
    return paths


def test_isolated_imports_give_each_target_its_own_neighbours(tmp_path, clean_imports):
    """Two files importing a neighbour of the same name from their own folders: the second
    got the first's module from the sys.modules cache (``dcopt check a/net.py b/net.py``)."""
    paths = _sibling_project(tmp_path, "dcopt_sib_layers")
    path_before = list(sys.path)
    with isolated_imports():
        assert load_target(paths["a"]).model.fc1.out_features == 5
    assert "dcopt_sib_layers" not in sys.modules and sys.path == path_before
    with isolated_imports():
        assert load_target(paths["b"]).model.fc1.out_features == 7
    with isolated_imports():
        assert load_target(paths["a"]).model.fc1.out_features == 5


def test_isolated_imports_keep_library_modules_and_the_model_usable(tmp_path, clean_imports):
    """What the target imported from the interpreter's prefixes (stdlib, site-packages,
    torch, dcopt) stays: dropping it would give the next target a second copy of
    torch's or dcopt's classes. A folder named site-packages that the file puts on the
    path counts as installed packages too."""
    lib = tmp_path / "env" / "site-packages"
    lib.mkdir(parents=True)
    (lib / "dcopt_sib_installed.py").write_text("X = 1\n")
    (tmp_path / "dcopt_sib_own.py").write_text("X = 2\n")
    path = write(tmp_path, "m.py", f"""
        import sys
        sys.path.append({str(lib)!r})
        import dcopt_sib_installed, dcopt_sib_own, colorsys
        model = Net()
        def example_inputs():
            return (torch.randn(1, 4),)
    """)
    with isolated_imports():
        t = load_target(path)
        # until the scope ends the model's module is registered: inspect finds its source
        import inspect
        assert "class Net" in inspect.getsource(type(t.model))
    assert "dcopt_sib_own" not in sys.modules and not any(m.startswith("dcopt_target_") for m in sys.modules)
    assert "dcopt_sib_installed" in sys.modules and "colorsys" in sys.modules
    assert str(lib) not in sys.path
    del sys.modules["dcopt_sib_installed"]


def test_check_forward_restores_training_flags(tmp_path):
    path = write(tmp_path, "m.py", """
        model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout())
        def example_inputs():
            return (torch.randn(1, 4),)     # a batch of one: BatchNorm only accepts it in eval mode
    """)
    t = load_target(path)
    assert all(m.training for m in t.model.modules())


# ----------------------------------------------------------------------------- file errors

def test_missing_file():
    assert error_of("no/such/model.py") == "file not found: no/such/model.py"


def test_directory(tmp_path):
    assert "is a directory" in error_of(str(tmp_path) + "/")


def test_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "bad.py", "\n\ndef build_model(:\n    pass\n", header="import torch\n")
    msg = error_of(path)
    assert msg.startswith("syntax error in ") and "bad.py:4" in msg


def test_file_raising_at_import_names_its_line(tmp_path):
    path = write(tmp_path, "boom.py", "x = 1 / 0\n", header="import torch\n")
    msg = error_of(path)
    assert "ZeroDivisionError" in msg and "boom.py:2" in msg


def test_sys_exit_in_file(tmp_path):
    path = write(tmp_path, "script.py", "import sys\nsys.exit(3)\n", header="")
    assert "sys.exit(3)" in error_of(path)


def test_no_model_found_lists_classes(tmp_path):
    path = write(tmp_path, "m.py", "")
    msg = error_of(path)
    assert msg.startswith("no model found in") and "--model NAME" in msg and "Net" in msg


def test_unknown_model_name_suggests(tmp_path):
    path = write(tmp_path, "m.py", "")
    assert "did you mean Net" in error_of(path, model_name="Nett")


def test_class_needing_arguments(tmp_path):
    path = write(tmp_path, "m.py", """
        class Wide(Net):
            def __init__(self, width):
                super().__init__(width)
    """)
    assert "cannot instantiate Wide with no arguments" in error_of(path, model_name="Wide", input_shapes=["1,4"])


def test_builder_returning_non_module(tmp_path):
    path = write(tmp_path, "m.py", "def build_model():\n    return 42\n")
    assert error_of(path) == "build_model() returned int, not a torch.nn.Module"


def test_builder_raising_names_its_line(tmp_path):
    path = write(tmp_path, "m.py", "def build_model():\n    raise ValueError('no config')\n")
    msg = error_of(path)
    assert "build_model() raised ValueError: no config" in msg
    assert f"m.py:{line_of(path, 'raise ValueError')}" in msg


def test_no_example_inputs(tmp_path):
    path = write(tmp_path, "m.py", "model = Net()\n")
    assert "--input-shape" in error_of(path)


def test_example_inputs_of_wrong_type(tmp_path):
    path = write(tmp_path, "m.py", "model = Net()\ndef example_inputs():\n    return 3\n")
    assert "expected a tuple of tensors" in error_of(path)


def test_dtype_without_input_shape(tmp_path):
    path = write(tmp_path, "m.py", "model = Net()\ndef example_inputs():\n    return (torch.randn(1, 4),)\n")
    assert "--dtype applies to" in error_of(path, dtype="int64")


def test_wrong_input_shape_names_forward_line(tmp_path):
    path = write(tmp_path, "m.py", "model = Net()\n")
    msg = error_of(path, input_shapes=["2,5"])
    assert msg.startswith("the model's forward failed on the example inputs (2x5 float32)")
    assert f"m.py:{line_of(path, 'return self.fc2')}" in msg and "RuntimeError" in msg


MASKED_SRC = """
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 8)
        def forward(self, x, mask=None, *, scale=1.0):
            h = self.fc(x)
            if mask is not None:
                h = h * mask
            return h * scale
    model = Masked()
    def example_inputs():
        return (torch.randn(2, 4),)
"""


def test_concrete_args_are_checked_against_forward_and_used_by_the_forward_check(tmp_path):
    path = write(tmp_path, "m.py", MASKED_SRC)
    t = load_target(path, concrete_args={"mask": None, "scale": 2.0})
    assert t.concrete_args == {"mask": None, "scale": 2.0}
    assert "has no parameter 'mak'" in error_of(path, concrete_args={"mak": None})
    assert "did you mean mask" in error_of(path, concrete_args={"mak": None})
    assert "the example inputs already give 'x'" in error_of(path, concrete_args={"x": None})
    # the forward check runs with them: a value the forward cannot take fails there, with its line
    msg = error_of(path, concrete_args={"mask": "no"})
    assert msg.startswith("the model's forward failed") and f"m.py:{line_of(path, 'h = h * mask')}" in msg


def test_target_error_is_a_dcopt_error():
    assert issubclass(TargetError, DcoptError)


def test_uninterpretable_target():
    assert "cannot interpret TARGET 'resnet'" in error_of("resnet")


# ----------------------------------------------------------------------------- module:attr

@pytest.fixture
def package(tmp_path, monkeypatch):
    pkg = tmp_path / "dcopt_tpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(textwrap.dedent(MLP_SRC) + textwrap.dedent("""
        net = Net()
        def make(width=3):
            return Net(width)
        def example_inputs():
            return (torch.randn(2, 4),)
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield "dcopt_tpkg.nets"
    for name in [m for m in sys.modules if m.startswith("dcopt_tpkg")]:
        del sys.modules[name]


def test_module_attr_instance_and_callable(package):
    t = load_target(f"{package}:net")
    assert t.source == f"{package}:net" and t.example_inputs[0].shape == (2, 4)
    t = load_target(f"{package}:make")
    assert t.model.fc1.out_features == 3 and t.source.endswith("make()")
    t = load_target(f"{package}:Net", input_shapes=["1,4"])
    assert t.model.fc1.out_features == 8


def test_module_attr_errors(package):
    assert error_of("dcopt_no_such_pkg.models:net") == \
        "cannot import module 'dcopt_no_such_pkg.models': no module named 'dcopt_no_such_pkg'"
    assert "has no attribute 'nett'" in error_of(f"{package}:nett")
    assert "did you mean net" in error_of(f"{package}:nett")
    assert "not a torch.nn.Module" in error_of(f"{package}:torch")


# ----------------------------------------------------------------------------- torchvision

def test_torchvision_defaults():
    pytest.importorskip("torchvision")
    t = load_target("torchvision:resnet18", run_forward=False)
    assert t.example_inputs[0].shape == (1, 3, 224, 224)
    assert t.source == "torchvision.models.resnet18(weights=None)"
    t = load_target("torchvision:resnet18", input_shapes=["2,3,64,64"])
    assert t.example_inputs[0].shape == (2, 3, 64, 64)


def test_torchvision_inception_input_is_299():
    pytest.importorskip("torchvision")
    t = load_target("torchvision:inception_v3", run_forward=False)
    assert t.example_inputs[0].shape == (1, 3, 299, 299)


def test_torchvision_unknown_name_suggests():
    pytest.importorskip("torchvision")
    msg = error_of("torchvision:resnet19")
    assert msg.startswith("torchvision has no model 'resnet19'") and "resnet18" in msg
