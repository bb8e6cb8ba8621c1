"""Export: the smaller plain model equals the eval-mode gated model, and costs what was predicted."""
import random
import subprocess
import sys
import textwrap

import pytest
import torch
import torchvision
from torch import nn

import dcopt
from checks import assert_exact_export
from models import build, CASES


def random_sizes(dm, rng, lo=0.0, hi=1.0):
    return {g.name: rng.randint(max(1, int(lo * g.width)), max(1, int(hi * g.width))) for g in dm.plan.groups}


def check(dm, sizes, inputs, tol=1e-5):
    return assert_exact_export(dm, inputs, sizes, tol=tol)


@pytest.mark.parametrize("name", sorted(CASES))
def test_equivalence_at_random_sizes(name):
    model, inputs = build(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dm = dcopt.convert(model, inputs, kappa_min=1e-3)  # floor 1: every size down to 1 can be set
    assert dm.plan.groups, f"{name}: expected dynamic groups"
    rng = random.Random(0)
    for _ in range(6):
        check(dm, random_sizes(dm, rng), inputs)
    check(dm, {g.name: 1 for g in dm.plan.groups}, inputs)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_export_keeps_user_class_when_possible_else_graph_module():
    model, inputs = build("mlp")
    dm = dcopt.convert(model, inputs)
    dm.set_sizes({"fc1": 5, "fc2": 3})
    small = dcopt.export(dm)
    assert type(small) is type(model)
    assert small.fc1.out_features == 5 and small.fc2.in_features == 5 and small.fc2.out_features == 3
    model, inputs = build("sliced")  # its forward has a literal width (view(-1, 30)) and a slice
    dm = dcopt.convert(model, inputs)
    dm.set_sizes({"conv": 4, "fc1": 10})
    small = dcopt.export(dm)
    assert isinstance(small, torch.fx.GraphModule)
    assert "view(-1, 20)" in small.code and small.fc2.in_features == 10


def test_export_attributes_are_consistent():
    model, inputs = build("crnn_gru")
    dm = dcopt.convert(model, inputs)
    dm.set_sizes({"rnn": 5, "conv": 9})
    small = dcopt.export(dm)
    rnn = small.rnn
    assert rnn.hidden_size == 5 and rnn.input_size == 9 and rnn.weight_ih_l1.shape == (15, 10)
    assert rnn.weight_ih_l0_reverse.shape == (15, 9) and small.head.in_features == 10
    assert small.bn.num_features == 9 and small.bn.running_mean.shape == (9,)
    assert "dcopt" not in type(small).__module__
    for m in small.modules():
        assert type(m).__module__.startswith(("torch", "models")), type(m)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "densenet121", "efficientnet_b0"])
def test_torchvision_round_trip(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    x = (torch.randn(1, 3, 64, 64),)
    dm = dcopt.convert(model, x)
    check(dm, random_sizes(dm, random.Random(1), 0.3, 0.9), x, tol=1e-4)


def test_verify_is_on_by_default_and_export_rejects_non_dynamic():
    with pytest.raises(TypeError):
        dcopt.export(nn.Linear(2, 2))
    model, inputs = build("residual")
    dm = dcopt.convert(model, inputs)
    with pytest.raises(KeyError):
        dcopt.export(dm, sizes={"nope": 2})


# torch.export's own complaint about nn.RNNBase re-assigning _flat_weights while it traces
# (any GRU does it, with or without dcopt); the exported program is checked below
@pytest.mark.filterwarnings("ignore:The tensor attributes self.rnn._flat_weights")
def test_exported_loads_without_dcopt_and_runs_under_torch_export(tmp_path):
    model, inputs = build("crnn_gru")
    dm = dcopt.convert(model, inputs)
    dm.set_sizes({"rnn": 6, "conv": 11})
    small = dcopt.export(dm)
    folder = dcopt.save_exported(small, tmp_path / "small", example_inputs=inputs)
    assert (folder / "model.pt2").exists(), (folder / "WHY.txt").read_text()
    torch.save(inputs, tmp_path / "inputs.pt")
    with torch.no_grad():
        torch.save(small.eval()(*inputs), tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys, importlib.util
        sys.modules["dcopt"] = None  # any `import dcopt` now fails
        import torch
        spec = importlib.util.spec_from_file_location("small", r"{folder}/__init__.py")
        mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
        model = mod.load()
        inputs = torch.load(r"{tmp_path}/inputs.pt", weights_only=True)
        expected = torch.load(r"{tmp_path}/expected.pt", weights_only=True)
        assert torch.allclose(model(*inputs), expected, atol=1e-6)
        program = torch.export.load(r"{folder}/model.pt2").module()
        assert torch.allclose(program(*inputs), expected, atol=1e-5)
        print("OK")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "OK", out.stderr


def test_onnx_export_of_exported_model(tmp_path):
    pytest.importorskip("onnx")
    model, inputs = build("conv_bn_flatten")
    dm = dcopt.convert(model, inputs)
    dm.set_sizes({"conv1": 5, "conv2": 3})
    small = dcopt.export(dm).eval()
    path = tmp_path / "small.onnx"
    torch.onnx.export(small, inputs, str(path), dynamo=True)
    import onnx
    graph = onnx.load(str(path)).graph
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert path.stat().st_size > 0 and list(shapes.values())[0] == [2, 3, 8, 8]


def test_export_report_measures_the_models():
    model, inputs = build("mlp")
    dm = dcopt.convert(model, inputs)
    dm.set_sizes({"fc1": 8})
    small = dcopt.export(dm)
    rep = dcopt.export_report(dm, small)
    assert rep["macs_after"] == round(dm.complexity("kept").macs.item()) < rep["macs_before"]
    assert rep["params_after"] == sum(p.numel() for p in small.parameters())
    assert {g["name"]: g["kept"] for g in rep["groups"]} == {"fc1": 8, "fc2": 24}
    assert rep["params_unused"] == 0


class _WithSpare(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.spare = nn.Linear(8, 16), nn.Linear(16, 4), nn.Linear(100, 100)

    def forward(self, x):
        return self.b(self.a(x).relu())


def test_export_report_counts_params_as_complexity_does_and_the_unused_apart():
    """A submodule the forward never calls: complexity() does not count it, the export (an
    instance of the user's class) keeps it. The report measured every parameter of the
    export, so "after" (10 130) came out larger than "before" (212)."""
    dm = dcopt.convert(_WithSpare(), (torch.randn(2, 8),))
    dm.set_sizes({"a": 4})
    small = dcopt.export(dm)
    assert isinstance(small, _WithSpare)
    rep = dcopt.export_report(dm, small)
    assert rep["params_before"] == round(dm.complexity("full").params.item())
    assert rep["params_after"] == round(dm.complexity("kept").params.item()) < rep["params_before"]
    assert rep["params_unused"] == 100 * 100 + 100


class _RowLoop(nn.Module):
    def forward(self, x):
        return torch.stack([row * 2 for row in x])  # iterating a proxy: fx cannot trace it


class _Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent: neither fx nor torch.export can trace it
            return x * 2
        return x


class _WithOpaque(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.block = block
        self.fc2 = nn.Linear(8, 8)
        self.fc3 = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(self.block(self.fc1(x)))))


def test_save_model_with_opaque_block_writes_program_or_says_why(tmp_path):
    x = (torch.ones(3, 4),)
    dm = dcopt.convert(_WithOpaque(_RowLoop()), x)
    assert dm.group_names == ["fc2"]
    dm.set_sizes({"fc2": 3})
    small = dcopt.export(dm)
    folder = dcopt.save_exported(small, tmp_path / "s", example_inputs=x)
    assert (folder / "model.pt2").exists() and not (folder / "__init__.py").exists()
    assert "__init__.py not written" in (folder / "WHY.txt").read_text()
    program = torch.export.load(folder / "model.pt2").module()
    assert torch.allclose(program(*x), small(*x))

    dm = dcopt.convert(_WithOpaque(_Branchy()), x)
    small = dcopt.export(dm)
    with pytest.raises(dcopt.ExportError, match="could not save the model"):
        dcopt.save_exported(small, tmp_path / "t", example_inputs=x)


def test_count_macs_counts_lstm_once_in_any_dtype():
    m = nn.LSTM(3, 4, batch_first=True)
    x = torch.randn(2, 5, 3)
    expected = 2 * 5 * 4 * 4 * (3 + 4)  # batch · steps · 4 gates · H · (I + H)
    assert dcopt.count_macs(m, (x,)) == expected
    assert dcopt.count_macs(m.double(), (x.double(),)) == expected


def test_export_report_of_a_model_exported_at_other_sizes():
    """export(dm, sizes=...) leaves dm's own sizes alone: the report read dm's widths and
    put them beside the export's MACs. Now it takes the sizes, and refuses a mismatch."""
    model, inputs = build("mlp")
    dm = dcopt.convert(model, inputs)
    small = dcopt.export(dm, sizes={"fc1": 8, "fc2": 6})
    with pytest.raises(ValueError, match="pass the sizes given to export"):
        dcopt.export_report(dm, small)
    rep = dcopt.export_report(dm, small, sizes={"fc1": 8, "fc2": 6})
    assert {g["name"]: g["kept"] for g in rep["groups"]} == {"fc1": 8, "fc2": 6}
    dm.set_sizes({"fc1": 8, "fc2": 6})
    assert rep["macs_after"] == round(dm.complexity("kept").macs.item())


def test_export_report_of_a_folded_export_counts_the_new_biases_as_used():
    """Folding BatchNorm gives bias-free convs a bias: the report took their names for
    parameters of submodules the forward never calls."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    x = (torch.randn(2, 3, 8, 8),)
    dm = dcopt.convert(model, x)
    dm.set_sizes({"0": 5})
    small = dcopt.export(dm, fold_batchnorm=True)
    rep = dcopt.export_report(dm, small)
    assert rep["params_unused"] == 0
    assert rep["params_after"] == sum(p.numel() for p in small.parameters())


class _DeadCall(nn.Module):
    """A call whose result is dropped, in a model whose export is a GraphModule (a literal
    width in a reshape)."""

    def __init__(self):
        super().__init__()
        self.aux, self.fc1, self.fc2 = nn.Linear(5, 5), nn.Linear(5, 8), nn.Linear(8, 3)

    def forward(self, x):
        _unused = self.aux(x)
        return self.fc2(torch.relu(self.fc1(x)).reshape(-1, 8))


def test_a_call_whose_result_is_dropped_stays_in_the_export():
    """Export's dead-code elimination dropped it from the GraphModule: the analysis and
    complexity() count its MACs (the user's model runs it), the export did not."""
    x = (torch.randn(2, 4, 5),)
    dm = dcopt.convert(_DeadCall(), x)
    small = assert_exact_export(dm, x, {"fc1": 4}, others=((torch.randn(3, 2, 5),),))
    assert isinstance(small, torch.fx.GraphModule) and hasattr(small, "aux")


def test_an_export_that_cannot_run_is_an_export_error(monkeypatch):
    """A slice the analysis should not have planned shows as an ExportError naming the
    failure, not as torch's RuntimeError from inside the exported model."""
    export_module = sys.modules["dcopt.export"]   # the attribute dcopt.export is the function

    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x5 and 8x3)")

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(2, 4)
    dm = dcopt.convert(model, (x,))
    monkeypatch.setattr(export_module, "slice_graph_module", lambda *a, **k: Broken())
    with pytest.raises(dcopt.ExportError, match=r"fails on the example inputs \(RuntimeError: mat1 and mat2"):
        dcopt.export(dm)


class _TiedAlias(nn.Module):
    """``self.W = self.lin.weight``: one tensor under two names (tied weights)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 4)
        self.W = self.lin.weight

    def forward(self, x):
        return self.lin(x) + torch.tanh(x) @ self.W.t()


def test_an_export_of_the_users_class_keeps_tied_weights_tied():
    """The copy of the user's class untied the alias: 68 parameters where the model and
    complexity() have 36, and the two copies trained apart."""
    torch.manual_seed(0)
    x = torch.randn(2, 8)
    dm = dcopt.convert(_TiedAlias(), (x,))
    small = dcopt.export(dm)
    assert type(small) is _TiedAlias
    assert small.W is small.lin.weight
    assert sum(p.numel() for p in small.parameters()) == round(dm.complexity("kept").params.item()) == 36
