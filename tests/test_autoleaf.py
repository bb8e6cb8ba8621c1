"""Issue 10: trace what can be traced. Submodules fx cannot trace become opaque leaves
(full width in and out, parameters untouched), the rest of the model is still optimised,
export stays exact, and the report names each opaque block with the user's line."""
import inspect
import json
import random

import pytest
import torch
from rich.console import Console
from torch import nn

import dcopt
from checks import assert_exact_export

# ---------------------------------------------------------------------------------------
# Blocks fx cannot trace, each the way real models are
# ---------------------------------------------------------------------------------------


class SignBranch(nn.Module):
    """Data-dependent control flow inside one block."""

    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        if x.sum() > 0:  # MARK-branch
            return self.lin(x)
        return -x


class Stage(nn.Module):
    """A traceable container around the untraceable block: only the block goes opaque."""

    def __init__(self, d_in, d_mid, d_out):
        super().__init__()
        self.pre = nn.Linear(d_in, d_mid)
        self.block = SignBranch(d_mid)
        self.post = nn.Linear(d_mid, d_out)

    def forward(self, x):
        return self.post(self.block(self.pre(x)))


class BranchNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.stage = Stage(16, 12, 10)
        self.fc2 = nn.Linear(10, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        h = torch.relu(self.stage(h))
        return self.out(torch.relu(self.fc2(h)))


class LengthMask(nn.Module):
    """As speech encoders do: a mask from int(lengths.max()), padded frames cut and zeroed."""

    def forward(self, x, lengths):
        t = int(lengths.max())  # MARK-int
        mask = torch.arange(t, device=x.device)[None, :] < lengths[:, None]
        return x[:, :t] * mask[..., None].to(x.dtype)


class SpeechNet(nn.Module):
    def __init__(self, feats=12):
        super().__init__()
        self.front = nn.Linear(feats, 32)
        self.mask = LengthMask()
        self.gru = nn.GRU(32, 24, batch_first=True)
        self.fc = nn.Linear(24, 16)
        self.out = nn.Linear(16, 5)

    def forward(self, x, lengths):
        h = torch.relu(self.front(x))
        h = self.mask(h, lengths)
        h, _ = self.gru(h)
        return self.out(torch.relu(self.fc(h)))


class StepLoop(nn.Module):
    """Iterates over a proxy: a hand-written recurrence over the time steps."""

    def __init__(self, d):
        super().__init__()
        self.cell = nn.Linear(2 * d, d)

    def forward(self, x):  # (T, B, d)
        h = torch.zeros_like(x[0])
        outs = []
        for xt in x:  # MARK-iter
            h = torch.tanh(self.cell(torch.cat([xt, h], -1)))
            outs.append(h)
        return torch.stack(outs)


class LoopNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 16)
        self.loop = StepLoop(16)
        self.fc = nn.Linear(16, 12)
        self.out = nn.Linear(12, 4)

    def forward(self, x):  # (B, T, 5)
        h = torch.relu(self.inp(x)).transpose(0, 1)
        h = self.loop(h).transpose(0, 1)
        return self.out(torch.relu(self.fc(h)))


class PerSampleNorm(nn.Module):
    """A len(x) loop over the batch (vision code does this)."""

    def forward(self, x):
        out = []
        for i in range(len(x)):  # MARK-len
            out.append(x[i] / (x[i].abs().amax() + 1.0))
        return torch.stack(out)


class LenConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.norm = PerSampleNorm()
        self.conv3 = nn.Conv2d(12, 10, 3, padding=1)
        self.fc = nn.Linear(10, 6)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        h = self.norm(self.conv2(h))
        h = torch.relu(self.conv3(h)).mean((2, 3))
        return self.fc(h)


def _line(obj, marker: str) -> int:
    lines, start = inspect.getsourcelines(obj)
    return start + next(i for i, text in enumerate(lines) if marker in text)


def _img(b=2):
    return (torch.randn(b, 3, 8, 8),)


def _speech(b=3, t=9):
    lengths = torch.tensor([t - 2, t, t - 4][:b])
    return (torch.randn(b, t, 12), lengths)


# name -> (model factory, example inputs, other inputs, opaque block, its class, marker,
#          groups that must be dynamic, groups that must be rejected by the block)
CASES = {
    "branch": (BranchNet, lambda: (torch.randn(4, 6),), lambda: (torch.randn(7, 6),),
               "stage.block", SignBranch, "MARK-branch", {"fc1", "fc2"}, {"stage.pre"}),
    "int_lengths": (SpeechNet, _speech, lambda: _speech(2, 6),
                    "mask", LengthMask, "MARK-int", {"gru", "fc"}, {"front"}),
    "iter_proxy": (LoopNet, lambda: (torch.randn(2, 5, 5),), lambda: (torch.randn(3, 4, 5),),
                   "loop", StepLoop, "MARK-iter", {"fc"}, {"inp"}),
    "len_loop": (LenConvNet, _img, lambda: _img(3),
                 "norm", PerSampleNorm, "MARK-len", {"conv1", "conv3"}, {"conv2"}),
}


def _render(analysis) -> str:
    console = Console(record=True, width=400, color_system=None)
    console.print(analysis.render())
    return console.export_text()


def _check_export(dm, sizes, inputs, others):
    return assert_exact_export(dm, inputs, sizes, others=(others,))


@pytest.mark.parametrize("case", sorted(CASES))
def test_untraceable_block_becomes_opaque_leaf(case):
    factory, make_inputs, make_others, block, cls, marker, dynamic, rejected = CASES[case]
    torch.manual_seed(0)
    model = factory()
    inputs, others = make_inputs(), make_others()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    where = f"test_autoleaf.py:{_line(cls, marker)}"

    # strict_trace restores the old behaviour: fail, naming the block and the line
    with pytest.raises(dcopt.TraceError) as info:
        dcopt.convert(model, inputs, strict_trace=True)
    assert info.value.module == block and info.value.location.endswith(where)

    a = dcopt.analyze(model, inputs)
    assert [(o.name, o.type) for o in a.opaque] == [(block, cls.__name__)]
    assert a.opaque[0].location.endswith(where) and a.opaque[0].reason
    d = json.loads(json.dumps(a.to_dict()))
    assert [o["name"] for o in d["opaque"]] == [block] and d["opaque"][0]["location"].endswith(where)
    text = _render(a)
    assert block in text and where in text and "Opaque blocks" in text
    for name in rejected:  # FCL: the group feeding the block keeps its width, and says why
        g = a.group(name)
        assert g.status == "rejected" and any("opaque block" in r and where in r for r in g.reasons), g.reasons
    assert a.roles[block] == "FCL"

    dm = dcopt.convert(model, inputs, kappa_min=1e-3)  # floor 1: every size down to 1 can be set
    names = set(dm.group_names)
    assert dynamic <= names and not (rejected & names), names
    assert all(not q.startswith(block + ".") for q in dm.plan.params)  # its parameters untouched
    rng = random.Random(0)
    for _ in range(2):
        _check_export(dm, {g.name: rng.randint(1, g.width) for g in dm.plan.groups}, inputs, others)
    _check_export(dm, {g.name: 1 for g in dm.plan.groups}, inputs, others)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_leaves_dcopt_understands_keep_their_rules():
    a = dcopt.analyze(SpeechNet(), _speech())
    assert a.roles["gru"] == "DCL" and a.group("gru").status == "dynamic"
    assert [o.name for o in a.opaque] == ["mask"]  # the GRU is a leaf, but not an opaque one


class ClippedLinear(nn.Linear):
    """A Linear subclass whose own forward fx cannot trace: opaque, not a Linear."""

    def forward(self, x):
        y = super().forward(x)
        if y.abs().max() > 1.0:  # depends on every output feature
            y = y / y.abs().max()
        return y


def test_auto_leaf_subclass_of_known_layer_is_opaque():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), ClippedLinear(8, 8), nn.ReLU(), nn.Linear(8, 6),
                          nn.ReLU(), nn.Linear(6, 2))
    inputs = (torch.randn(3, 4),)
    a = dcopt.analyze(model, inputs)
    assert [o.name for o in a.opaque] == ["2"]
    assert a.roles["2"] == "FCL" and a.group("0").status == "rejected"
    dm = dcopt.convert(model, inputs)
    assert "2" not in dm.group_names and "4" in dm.group_names
    _check_export(dm, {"4": 2}, inputs, (torch.randn(5, 4),))


class SharedProjBlock(nn.Module):
    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        if x.mean() > 0:
            return self.proj(x)
        return self.proj(-x)


class SharedNet(nn.Module):
    """``proj`` is called by the traced forward and, inside an opaque block, by the block."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.fc = nn.Linear(4, 8)
        self.block = SharedProjBlock(self.proj)
        self.head = nn.Linear(8, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        h = torch.relu(self.proj(torch.relu(self.fc(x))))
        h = self.block(h)
        return self.out(torch.relu(self.head(h)))


def test_module_shared_with_opaque_block_keeps_its_width():
    model, inputs = SharedNet(), (torch.randn(3, 4),)
    a = dcopt.analyze(model, inputs)
    assert [o.name for o in a.opaque] == ["block"]
    # proj's weight is the block's too: neither its rows (proj) nor its columns (fc) may go
    for name in ("proj", "fc"):
        g = a.group(name)
        assert g.status == "rejected" and any("opaque block" in r for r in g.reasons), g.reasons
    dm = dcopt.convert(model, inputs)
    assert dm.group_names == ["head"]
    _check_export(dm, {"head": 2}, inputs, (torch.randn(2, 4),))


class Inner(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


class RootBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Inner()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        x = self.inner(x)
        if x.mean() > 0:  # MARK-root
            return self.fc(x)
        return x


def test_untraceable_top_level_forward_is_rejected_cleanly():
    with pytest.raises(dcopt.TraceError) as info:
        dcopt.convert(RootBranches(), (torch.randn(2, 4),))
    err = info.value
    assert err.module == ""
    assert err.location.endswith(f"test_autoleaf.py:{_line(RootBranches.forward, 'MARK-root')}")
    text = str(err)
    assert "top-level forward" in text and "concrete_args" in text and "submodule" in text
    assert "inner" in text  # the leaves it already made are listed
    with pytest.raises(dcopt.TraceError):
        dcopt.analyze(RootBranches(), (torch.randn(2, 4),))


def test_traceable_model_has_no_opaque_leaves():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    a = dcopt.analyze(model, (torch.randn(2, 4),), strict_trace=True)
    assert a.opaque == [] and a.to_dict()["opaque"] == []
    assert "Opaque blocks" not in _render(a)
