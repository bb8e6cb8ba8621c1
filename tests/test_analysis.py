"""The analysis: exact roles, groups and rejections on hand-written models and torchvision."""
import pytest
import torch
import torchvision
from torch import nn

import dcopt
from models import build, DataDependent


def analyze(name):
    model, inputs = build(name)
    return dcopt.analyze(model, inputs)


def dynamic(a):
    return {g.name: g for g in a.groups if g.status == "dynamic"}


def test_mlp_roles_and_groups():
    a = analyze("mlp")
    assert a.roles["fc1"] == "DCL" and a.roles["fc2"] == "DCL" and a.roles["fc3"] == "ACL"
    assert a.roles["x"] == "FCL"
    groups = dynamic(a)
    assert set(groups) == {"fc1", "fc2"}
    assert groups["fc1"].width == 32 and groups["fc1"].consumers == ["fc2"]
    fc3 = a.group("fc3")
    assert fc3.status == "fixed" and "reaches the model output" in fc3.reasons[0]
    assert a.unsupported == []
    assert a.macs == 4 * (16 * 32 + 32 * 24 + 24 * 4)
    assert a.convertible and a.dynamic_fraction == 1.0


def test_conv_bn_flatten_head():
    a = analyze("conv_bn_flatten")
    assert set(dynamic(a)) == {"conv1", "conv2"}
    assert a.roles["bn1"] == "ACL" and a.roles["bn2"] == "ACL" and a.roles["fc"] == "ACL"
    # the flatten turned each of conv2's channels into a block of 4*4 features for fc
    w = a.plan.params["fc.weight"][1]
    assert len(w) == 160 and w.ch[:16].tolist() == [0] * 16 and w.ch[16] == 1


def test_crnn_bidirectional_gru():
    a = analyze("crnn_gru")
    groups = dynamic(a)
    assert set(groups) == {"conv", "rnn"}
    assert groups["rnn"].width == 12
    assert a.roles["rnn"] == "DCL" and a.roles["head"] == "ACL"
    # the head sees two blocks of H (both directions)
    cols = a.plan.params["head.weight"][1]
    assert cols.ch.tolist() == list(range(12)) * 2
    # stacked layer 1 reads both directions of layer 0
    assert a.plan.params["rnn.weight_ih_l1"][1].ch.tolist() == list(range(12)) * 2
    assert a.plan.params["rnn.weight_ih_l0"][0].ch.tolist() == list(range(12)) * 3


def test_residual_couples_stem_and_block():
    a = analyze("residual")
    groups = dynamic(a)
    assert set(groups) == {"stem", "conv1"}
    assert sorted(groups["stem"].producers) == ["conv2", "stem"]


def test_dense_concat_offsets():
    a = analyze("dense_concat")
    assert set(dynamic(a)) == {"stem", "c1", "c2"}
    cols = a.plan.params["c2.weight"][1]
    names = [g.name for g in a.plan.groups]
    assert [names[g] for g in cols.gid.tolist()] == ["stem"] * 8 + ["c1"] * 6
    bn = a.plan.params["bn.weight"][0]
    assert [names[g] for g in bn.gid.tolist()] == ["stem"] * 8 + ["c1"] * 6 + ["c2"] * 6


def test_transformer_ffn_hidden_group_and_fixed_stream():
    a = analyze("transformer_ffn")
    assert set(dynamic(a)) == {"up"}
    down = a.group("down")
    assert down.status == "fixed"  # added to the model input: the stream keeps its width


def test_layernorm_over_features_and_another_dim_is_rejected_with_reason():
    """Over the features alone a LayerNorm is learned (masked statistics, tests/test_masked_norm.py);
    over the features and another dim at once it keeps them."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 10)
            self.norm = nn.LayerNorm((3, 10))
            self.b = nn.Linear(10, 2)

        def forward(self, x):
            return self.b(self.norm(self.a(x)))

    a = dcopt.analyze(M(), (torch.randn(2, 3, 6),))
    assert a.group("a").status == "rejected"
    (r,) = a.unsupported
    assert r.node == "norm" and "LayerNorm normalizes over the feature dimension" in r.reason
    assert r.location and r.location.endswith(f"test_analysis.py:{M.forward.__code__.co_firstlineno + 1}")
    assert not a.convertible


def test_groupnorm_per_channel_is_exact_other_groupnorm_rejected():
    def make(groups):
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(groups, 8), nn.Conv2d(8, 2, 1))

    assert dcopt.analyze(make(8), (torch.randn(1, 3, 6, 6),)).group("0").status == "dynamic"
    a = dcopt.analyze(make(2), (torch.randn(1, 3, 6, 6),))
    assert a.group("0").status == "rejected" and "GroupNorm with 2 groups" in a.unsupported[0].reason


def test_unknown_op_rejects_its_group_naming_the_op():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 8)
            self.b = nn.Linear(8, 2)

        def forward(self, x):
            return self.b(torch.cumsum(self.a(x), dim=-1))

    a = dcopt.analyze(M(), (torch.randn(3, 4),))
    assert a.group("a").status == "rejected"
    assert "normalizes over the feature dimension" in a.unsupported[0].reason or "cumsum" in a.unsupported[0].op

    class N(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 8)
            self.b = nn.Linear(8, 2)

        def forward(self, x):
            return self.b(torch.fliplr(self.a(x)))

    a = dcopt.analyze(N(), (torch.randn(3, 4),))
    assert a.group("a").status == "rejected"
    assert a.unsupported[0].op == "fliplr" and "no rule for fliplr" in a.unsupported[0].reason


def test_mean_over_features_rejected_but_over_space_kept():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 8, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.c(x).mean(1).flatten(1)[:, :4])

    a = dcopt.analyze(M(), (torch.randn(1, 3, 6, 6),))
    assert a.group("c").status == "rejected" and "reduces over the feature dimension" in a.unsupported[0].reason


def test_register_rule_extends_registry():
    class Scale(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(c))

        def forward(self, x):
            return x * self.weight

    model = nn.Sequential(nn.Linear(4, 6), Scale(6), nn.Linear(6, 2))
    fx_leaf = dcopt.analyze(model, (torch.randn(2, 4),), leaf_modules=[Scale])
    assert fx_leaf.group("0").status == "rejected"  # an opaque leaf has no rule

    registry = dcopt.rules.RuleRegistry()
    registry.modules.update(dcopt.rules.REGISTRY.modules)
    registry.functions.update(dcopt.rules.REGISTRY.functions)
    registry.methods.update(dcopt.rules.REGISTRY.methods)

    def scale_rule(ctx):
        fm = ctx.fmap(ctx.arg(0))
        if fm is not None:
            ctx.consumes(fm)
            ctx.plan_param("weight", (fm.pos,))
        return fm

    registry.register(Scale, rule=scale_rule)
    a = dcopt.analyze(model, (torch.randn(2, 4),), leaf_modules=[Scale], registry=registry)
    assert a.group("0").status == "dynamic" and a.roles["1"] == "ACL"


class _AddTo(nn.Module):
    """``x + y`` whose (careless) user rule only reads ``x``."""

    def forward(self, x, y):
        return x + y


class _TwoBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.add, self.head = nn.Linear(4, 6), nn.Linear(4, 6), _AddTo(), nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.add(self.a(x), self.b(x)))


def test_features_a_layer_rule_says_nothing_of_keep_their_width():
    """A module rule that ignores an argument (as the LSTM rule once ignored an ``hx``
    held in one value) would let that argument's group shrink while the layer still
    expects the full width. The walk keeps such features fixed, with the layer named."""
    registry = dcopt.rules.RuleRegistry()
    registry.modules.update(dcopt.rules.REGISTRY.modules)
    registry.functions.update(dcopt.rules.REGISTRY.functions)
    registry.methods.update(dcopt.rules.REGISTRY.methods)
    registry.register(_AddTo, rule=lambda ctx: ctx.fmap(ctx.arg(0)))
    model, x = _TwoBranches(), (torch.randn(3, 4),)
    a = dcopt.analyze(model, x, leaf_modules=[_AddTo], registry=registry)
    b = a.group("b")
    assert b.status == "rejected" and any("_AddTo in an argument its rule does not read" in r for r in b.reasons)


def test_data_dependent_control_flow_raises_trace_error_with_line():
    with pytest.raises(dcopt.TraceError) as info:
        dcopt.analyze(DataDependent(), (torch.randn(2, 4),))
    err = info.value
    line = DataDependent.forward.__code__.co_firstlineno + 1
    assert err.location.endswith(f"models.py:{line}")
    assert "concrete_args" in str(err)


def test_to_dict_is_json_ready():
    import json

    d = analyze("crnn_gru").to_dict()
    again = json.loads(json.dumps(d))
    assert again["convertible"] is True and {g["name"] for g in again["groups"]} >= {"conv", "rnn"}


def test_graph_is_networkx_over_nodes():
    a = analyze("mlp")
    assert a.graph.has_edge("fc1", "relu") and a.graph.nodes["fc1"]["role"] == "DCL"


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "vgg11", "densenet121"])
def test_torchvision_models(name):
    model = getattr(torchvision.models, name)(weights=None)
    a = dcopt.analyze(model, (torch.randn(1, 3, 64, 64),))
    assert a.convertible
    for r in a.rejections:
        assert r.reason
    for g in a.groups:
        assert g.status in ("dynamic", "fixed", "rejected")
    if name == "resnet18":
        stem = a.group("conv1")
        # the stem's channels run through layer1's residual adds: one coupled group
        assert set(stem.producers) == {"conv1", "layer1.0.conv2", "layer1.1.conv2"}
        assert a.dynamic_fraction > 0.9
    if name == "mobilenet_v2":
        # depthwise convs pass the expansion group through to the projection conv
        assert a.roles["features.2.conv.1.0"] == "ACL"
    if name == "densenet121":
        g = a.group("features.conv0")
        assert g.status == "dynamic"
    assert a.to_dict()["macs"] == a.macs


def _helper_relu(x):
    return torch.relu(x) + 1          # the node's line is here, inside the helper


class _Helper(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return _helper_relu(self.fc(x)).sum(-1)


def test_recorded_lines_are_the_ones_fx_full_stacks_give():
    """dcopt records one frame per node instead of fx's full stack (issue 7, tracing
    speed); every node must still point at the line fx's own stack trace points at."""
    import torchvision
    from models import CASES
    from dcopt.errors import source_location
    from dcopt.trace import DcoptTracer

    class FxStacks(DcoptTracer):
        def __init__(self):
            super().__init__()
            self.record_stack_traces = True

        create_node = torch.fx.Tracer.create_node

    models = [build(name)[0] for name in CASES] + [_Helper(), torchvision.models.mobilenet_v3_small()]
    located = 0
    for model in models:
        ours, theirs = DcoptTracer().trace(model), FxStacks().trace(model)
        lines = [(n.name, source_location(n.stack_trace)) for n in ours.nodes]
        assert lines == [(n.name, source_location(n.stack_trace)) for n in theirs.nodes]
        located += sum(loc is not None for _, loc in lines)
    assert located > 50
    helper = {n.name: source_location(n.stack_trace) for n in DcoptTracer().trace(_Helper()).nodes}
    assert helper["x"] is None                                  # placeholders: no user line
    assert helper["relu"].endswith(f"test_analysis.py:{_helper_relu.__code__.co_firstlineno + 1}")


def test_positions_gids_cached_and_fresh():
    """gids() is computed once per map (the walk asks often) but hands out a new set."""
    from dcopt.fmap import Positions

    a, b, f = Positions.group(3, 4), Positions.group(5, 2), Positions.fixed(3)
    mixed = Positions.cat([a, f, b])
    assert (a.whole_group, f.whole_group, mixed.whole_group) == (3, None, None)
    got = mixed.gids()
    got.add(99)
    assert mixed.gids() == {3, 5} and a.gids() == {3} and f.gids() == set()
    assert f.is_fixed() and not mixed.is_fixed() and mixed[4:7].is_fixed() and Positions.group(0, 0).is_fixed()


def test_lazy_code_graph_module_still_runs_and_prints():
    """analyze traces with lazy_code (no Python code generated unless needed); such a
    GraphModule must still run, print and deep-copy like fx's eager one."""
    import copy
    from dcopt.trace import trace

    model, x = build("residual")
    gm = trace(model, x, lazy_code=True).gm
    assert "def forward" in gm.code
    assert torch.equal(gm(*x), model(*x)) and torch.equal(copy.deepcopy(gm)(*x), model(*x))


def test_analyze_leaves_mixed_training_flags_and_statistics_alone():
    """analyze does not copy the model: its eval-mode, no-grad propagation must give every
    module its own flag back (a train-mode model with one eval submodule, and all-eval)."""
    import torchvision

    model = torchvision.models.resnet18()
    model.train()
    model.layer2.eval()
    for modes in ("mixed", "eval"):
        if modes == "eval":
            model.eval()
        flags = [m.training for m in model.modules()]
        state = {k: v.clone() for k, v in model.state_dict().items()}
        dcopt.analyze(model, (torch.randn(2, 3, 32, 32),))
        assert [m.training for m in model.modules()] == flags
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
