"""Modules and reductions whose meaning a rule misread: each is rejected with a reason
(and the rest still exports exactly), or accepted and exact."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dcopt
from checks import assert_exact_export

pytestmark = pytest.mark.usefixtures("one_thread")


def smallest(dm):
    return {g.name: dm.size_floor(g.name) for g in dm.plan.groups}


def check_rejected(model, inputs, group, word, others=()):
    """``group`` is rejected with ``word`` in a reason; convert → smallest sizes → export is
    exact on ``inputs`` and ``others``. Returns the analysis."""
    a = dcopt.analyze(model, inputs)
    g = a.group(group)
    assert g.status == "rejected", (g.status, g.reasons)
    assert any(word in r for r in g.reasons), g.reasons
    dm = dcopt.convert(model, inputs)
    assert group not in dm.group_names
    assert_exact_export(dm, inputs, smallest(dm), others=others)
    return a


def check_dynamic(model, inputs, group, others=()):
    dm = dcopt.convert(model, inputs)
    assert group in dm.group_names, [(g.name, g.status, g.reasons) for g in dm.analysis.groups]
    assert_exact_export(dm, inputs, smallest(dm), others=others)
    return dm


# -- 3: Embedding(max_norm) --------------------------------------------------------------

class MaxNormEmbed(nn.Module):
    def __init__(self):
        super().__init__()
        self.e = nn.Embedding(20, 16, max_norm=1.0)
        self.fc = nn.Linear(16, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, t):
        return self.head(torch.relu(self.fc(self.e(t))))


def test_embedding_max_norm_is_rejected_and_the_rest_exports_exactly():
    torch.manual_seed(0)
    check_rejected(MaxNormEmbed(), (torch.tensor([[0, 1, 2]]),), "e", "max_norm",
                   others=((torch.arange(20).view(2, 10),),))
    assert "fc" in dcopt.convert(MaxNormEmbed(), (torch.tensor([[0, 1, 2]]),)).group_names


def test_analyze_leaves_a_max_norm_embedding_weight_untouched():
    torch.manual_seed(0)
    m = MaxNormEmbed()
    w0, v0 = m.e.weight.detach().clone(), m.e.weight._version
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # and no warning: nothing of the user's was written
        dcopt.analyze(m, (torch.arange(20).view(2, 10),))
    assert torch.equal(m.e.weight, w0) and m.e.weight._version == v0


class WritesBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)
        return self.fc(x)


def test_a_forward_that_writes_a_buffer_is_refused_and_the_buffer_left_as_it_was():
    """fx runs ``self.calls.add_(1)`` once while tracing and records nothing: the converted
    model would never count (it warned, then converted a model that computes something
    else from the second call on when the buffer is read). Refused now, naming it; and
    analyze, which traces the user's own model, gives the value back."""
    model = WritesBuffer()
    for call in (dcopt.analyze, dcopt.convert):
        with pytest.raises(dcopt.TraceError, match=r"changes buffer\(s\) calls in place"):
            call(model, (torch.randn(2, 4),))
        assert model.calls.item() == 0


# -- 9: parametrized / pruned weights ------------------------------------------------------

def chain_with(layer):
    """l0 (dynamic) → l1 → layer (16 out) → head: l1's group reaches ``layer``."""
    return nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), layer, nn.ReLU(),
                         nn.Linear(16, 4))


@pytest.mark.parametrize("wrap", [nn.utils.parametrizations.weight_norm, nn.utils.parametrizations.spectral_norm])
def test_parametrized_layer_is_kept_fixed_and_the_rest_exports_exactly(wrap):
    torch.manual_seed(0)
    model = chain_with(wrap(nn.Linear(8, 16))).eval()
    x = (torch.randn(3, 8),)
    a = check_rejected(model, x, "2", "parametrization", others=((torch.randn(5, 8),),))
    assert a.group("0").status == "dynamic"


def _pruned():
    import torch.nn.utils.prune as prune
    layer = nn.Linear(8, 16)
    prune.l1_unstructured(layer, "weight", amount=0.3)
    return layer


def _old_weight_norm():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return nn.utils.weight_norm(nn.Linear(8, 16))


@pytest.mark.parametrize("make,word", [(_pruned, "prune.remove"), (_old_weight_norm, "remove_weight_norm")])
def test_hook_computed_weight_is_refused_with_the_way_out(make, word):
    """A typed error from tracing (the forward pre-hook), or a rejection of the layer: never a
    KeyError, and the message says how to make the weight a Parameter again."""
    try:
        a = dcopt.analyze(chain_with(make()), (torch.randn(3, 8),))
    except dcopt.DcoptError as e:
        assert word in str(e)
        return
    g = a.group("2")
    assert g.status == "rejected" and any(word in r for r in g.reasons), g.reasons
    assert a.group("0").status == "dynamic"


@pytest.mark.parametrize("make,word", [(_pruned, "prune.remove"), (_old_weight_norm, "remove_weight_norm"),
                                       (lambda: nn.utils.parametrizations.weight_norm(nn.Linear(8, 16)),
                                        "parametrization")])
def test_registry_keeps_a_layer_with_computed_weights_fixed(make, word):
    from dcopt.rules import REGISTRY
    from dcopt.rules.registry import computed_tensors

    layer = make()
    assert word in computed_tensors(layer)
    assert REGISTRY.for_module(layer) is not REGISTRY.for_module(nn.Linear(8, 16))
    assert computed_tensors(nn.Linear(8, 16)) is None


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.weight = self.a.weight
        self.c = nn.Linear(8, 3)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_weight_tied_across_modules_is_rejected_not_a_key_error():
    torch.manual_seed(0)
    check_rejected(Tied(), (torch.randn(3, 8),), "a", "tied", others=((torch.randn(5, 8),),))


# -- 10: reductions whose dim is not argument 1 ---------------------------------------------

class Reduce(nn.Module):
    def __init__(self, fn, d_in=8):
        super().__init__()
        self.a = nn.Linear(d_in, 16)
        self.b = nn.Linear(16, 4)
        self.fn = fn

    def forward(self, x):
        h = self.a(x)
        return self.b(h / self.fn(h))


@pytest.mark.parametrize("fn,word", [
    (lambda h: h.std(False), "feature"),
    (lambda h: torch.var(h, 1, True, True), "feature"),
    (lambda h: h.norm(-1, 1, keepdim=True), "feature"),
    (lambda h: torch.linalg.vector_norm(h, float("-inf"), 1, True), "feature"),
], ids=["std-unbiased", "var-legacy", "negative-order", "minus-inf-order"])
def test_reduction_over_features_with_positional_p_is_rejected(fn, word):
    torch.manual_seed(0)
    check_rejected(Reduce(fn), (torch.randn(3, 8),), "a", word, others=((torch.randn(5, 8),),))


@pytest.mark.parametrize("fn", [
    lambda h: h.norm(2, 1, keepdim=True),
    lambda h: torch.norm(h, 2, 1, True),
    lambda h: torch.linalg.vector_norm(h, 2, 1, True),
    lambda h: F.normalize(h, 2, 1),
    lambda h: F.normalize(h),
], ids=["norm-method", "torch.norm", "vector_norm", "normalize-p-dim", "normalize"])
def test_positive_norms_over_features_with_positional_p_are_exact(fn):
    """A p-norm (p > 0) over the features ignores the zeros a gate leaves: exact, with p
    and dim read from their positions."""
    torch.manual_seed(0)
    check_dynamic(Reduce(fn), (torch.randn(3, 8),), "a", others=((torch.randn(5, 8),),))


@pytest.mark.parametrize("fn", [
    lambda h: h.norm(2, 1, keepdim=True),
    lambda h: torch.linalg.vector_norm(h, 2, 1, True),
    lambda h: h.std(1, True, False).unsqueeze(1),    # keepdim is argument 3, not 2 (unbiased)
    lambda h: torch.var(h, 1, True, False).unsqueeze(1),
    lambda h: F.normalize(h, 2, 1),
], ids=["norm-method", "vector_norm", "std-legacy", "var-legacy", "normalize"])
def test_reduction_over_a_non_feature_dim_with_positional_p_is_exact(fn):
    torch.manual_seed(0)
    check_dynamic(Reduce(fn), (torch.randn(2, 5, 8),), "a", others=((torch.randn(3, 5, 8),),))


# -- 11: subclasses that change what the base computes --------------------------------------

class WSConv2d(nn.Conv2d):
    def _conv_forward(self, input, weight, bias):
        w = weight - weight.mean((1, 2, 3), keepdim=True)
        return super()._conv_forward(input, w / (w.std((1, 2, 3), keepdim=True) + 1e-5), bias)


class InitOnlyConv2d(nn.Conv2d):
    def __init__(self, cin, cout):
        super().__init__(cin, cout, 3, padding=1)

    def extra_repr(self):
        return "mine"


class Convs(nn.Module):
    def __init__(self, last):
        super().__init__()
        self.c0 = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.c2 = last
        self.o = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.o(F.relu(self.c2(F.relu(self.c1(F.relu(self.c0(x)))))))


def test_conv_subclass_overriding_conv_forward_is_not_a_conv():
    torch.manual_seed(0)
    model = Convs(WSConv2d(8, 8, 3, padding=1))
    x = (torch.randn(2, 3, 6, 6),)
    a = check_rejected(model, x, "c1", "module 'c2' (WSConv2d)", others=((torch.randn(3, 3, 6, 6),),))
    assert a.group("c0").status == "dynamic"


def test_conv_subclass_changing_only_init_keeps_the_conv_rule():
    torch.manual_seed(0)
    dm = check_dynamic(Convs(InitOnlyConv2d(8, 8)), (torch.randn(2, 3, 6, 6),), "c2",
                       others=((torch.randn(3, 3, 6, 6),),))
    assert "c1" in dm.group_names


# -- 12: unbatched inputs -------------------------------------------------------------------

class UnbatchedInstanceNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.inn = nn.InstanceNorm1d(4)
        self.b = nn.Linear(8, 3)

    def forward(self, x):            # x: (4, 6) is an unbatched (C=4, L=8) for the norm
        return self.b(self.inn(self.a(x)))


def test_unbatched_instance_norm_over_the_features_is_rejected():
    torch.manual_seed(0)
    check_rejected(UnbatchedInstanceNorm(), (torch.randn(4, 6),), "a", "normalizes over dim 1",
                   others=((torch.randn(4, 6) * 3,),))


class UnbatchedConvNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv1d(3, 8, 3)
        self.inn = nn.InstanceNorm1d(8, affine=True)
        self.o = nn.Conv1d(8, 2, 1)

    def forward(self, x):            # x: (C=3, L)
        return self.o(torch.relu(self.inn(self.c(x))))


def test_unbatched_conv_and_instance_norm_per_channel_are_exact():
    torch.manual_seed(0)
    model = UnbatchedConvNorm()
    with torch.no_grad():
        model.inn.weight.uniform_(0.5, 2)
        model.inn.bias.uniform_(-1, 1)
    check_dynamic(model, (torch.randn(3, 10),), "c", others=((torch.randn(3, 7),),))


def test_batchnorm1d_on_batched_2d_input_stays_per_channel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    check_dynamic(model, (torch.randn(4, 6),), "0", others=((torch.randn(7, 6),),))


# -- a model that is already converted ------------------------------------------------------

@pytest.mark.parametrize("how", ["analyze", "convert", "inside", "lazy"])
def test_an_already_converted_model_is_refused_by_name(how):
    """fx's own error on a DynamicModel speaks of a Proxy in float(); dcopt says what it is."""
    x = torch.randn(2, 8)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    dm = dcopt.convert(model) if how == "lazy" else dcopt.convert(model, (x,))
    target = nn.Sequential(dm, nn.ReLU()) if how == "inside" else dm
    call = dcopt.analyze if how == "analyze" else dcopt.convert
    with pytest.raises(dcopt.TraceError, match="already converted.*dcopt.export"):
        call(target, (x,))


class PackedTopLevel(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.rnn, self.c = nn.Linear(8, 16), nn.GRU(16, 12, batch_first=True), nn.Linear(12, 4)

    def forward(self, x, lengths):
        packed = nn.utils.rnn.pack_padded_sequence(self.a(x), lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        return self.c(nn.utils.rnn.pad_packed_sequence(out, batch_first=True)[0])


def test_packed_sequences_in_the_top_level_forward_say_what_to_do():
    """fx's own error from inside pack_padded_sequence speaks of __cuda_array_interface__."""
    with pytest.raises(dcopt.TraceError, match="packed sequences.*one submodule") as err:
        dcopt.analyze(PackedTopLevel(), (torch.randn(2, 5, 8), torch.tensor([5, 3])))
    assert "test_module_holes.py" in str(err.value)


class EncoderDecoderLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.dec = nn.LSTM(12, 20, batch_first=True), nn.LSTM(8, 20, batch_first=True)
        self.out = nn.Linear(20, 4)

    def forward(self, x, y):
        _, state = self.enc(x)       # (h_n, c_n), one value
        o, _ = self.dec(y, state)    # passed on whole
        return self.out(o)


def test_an_lstm_state_passed_on_whole_couples_encoder_and_decoder():
    """The decoder's rule read ``hx`` only as a tuple written in the call; one node holding
    the encoder's (h_n, c_n) left the encoder dynamic and the decoder full: torch's own
    "Expected hidden[0] size" at export."""
    torch.manual_seed(0)
    ex = (torch.randn(3, 7, 12), torch.randn(3, 5, 8))
    dm = dcopt.convert(EncoderDecoderLSTM(), ex)
    assert [(g.name, g.width) for g in dm.plan.groups] == [("enc", 20)]
    small = assert_exact_export(dm, ex, {"enc": 10}, others=((torch.randn(2, 4, 12), torch.randn(2, 9, 8)),))
    assert small.enc.hidden_size == small.dec.hidden_size == 10


class DepthwiseTransposed(nn.Module):
    def __init__(self, dims, mult, stride, bias):
        super().__init__()
        conv, tconv = (nn.Conv1d, nn.ConvTranspose1d) if dims == 1 else (nn.Conv2d, nn.ConvTranspose2d)
        self.a = conv(3, 8, 3)
        self.t = tconv(8, 8 * mult, 4, stride=stride, groups=8, padding=1, output_padding=stride - 1, bias=bias)
        self.b = conv(8 * mult, 4, 1)

    def forward(self, x):
        return self.b(torch.relu(self.t(self.a(x))))


@pytest.mark.parametrize("dims, mult, stride, bias", [(1, 1, 2, True), (1, 3, 1, False), (2, 2, 2, True)])
def test_depthwise_transposed_conv_follows_its_input_channels(dims, mult, stride, bias):
    """A depthwise transposed conv's weight is (in, multiplier, k...), not (out, 1, k...):
    it was refused as a "grouped" conv "in blocks of 1"; now it is sliced along its input
    channels, exactly, with MACs and parameters as counted."""
    torch.manual_seed(0)
    shape = (2, 3, 10) if dims == 1 else (2, 3, 9, 9)
    other = (3, 3, 13) if dims == 1 else (1, 3, 12, 11)
    dm = dcopt.convert(DepthwiseTransposed(dims, mult, stride, bias), (torch.randn(shape),))
    assert dm.group_names == ["a"]
    for k in (2, 5):
        small = assert_exact_export(dm, (torch.randn(shape),), {"a": k}, others=((torch.randn(other),),))
        assert (small.t.in_channels, small.t.out_channels, small.t.groups) == (k, k * mult, k)


class PackedInside(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(12, 20, batch_first=True)

    def forward(self, x, lengths):
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        y, _ = self.rnn(packed)
        return nn.utils.rnn.pad_packed_sequence(y, batch_first=True, total_length=x.shape[1])[0]


class PackedInSubmodule(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.enc, self.out = nn.Linear(12, 12), PackedInside(), nn.Linear(20, 4)

    def forward(self, x, lengths):
        return self.out(self.enc(self.inp(x), lengths))


def test_an_opaque_block_of_packed_sequences_says_so():
    """The documented way out (pack → RNN → unpack in one submodule) becomes an opaque
    block; its reason was fx's "__cuda_array_interface__ must be a dict"."""
    a = dcopt.analyze(PackedInSubmodule(), (torch.randn(3, 6, 12), torch.tensor([6, 3, 2])))
    reasons = [r.reason for r in a.rejections if r.kind == "unsupported"]
    assert any("opaque block enc" in r and "packed sequences" in r for r in reasons), reasons
    assert not any("cuda_array_interface" in r for r in reasons), reasons


class AssignsIntoATensor(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)

    def forward(self, x):
        h = self.a(x)
        h[:, 0] = 0.0
        return h


def test_item_assignment_gets_its_own_advice():
    """fx's "'Proxy' object does not support item assignment" came with advice about
    values the forward branches on; nothing branches there."""
    with pytest.raises(dcopt.TraceError, match="assignment into a tensor.*out of place") as err:
        dcopt.analyze(AssignsIntoATensor(), (torch.randn(2, 4),))
    assert "branches on" not in str(err.value)


class StdOverOne(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)

    def forward(self, x):
        return self.a(x).std(1, keepdim=True)


@pytest.mark.filterwarnings("ignore:std")   # torch: "std(): degrees of freedom is <= 0"
def test_a_nan_output_of_the_users_model_is_named_as_such():
    """A std over a dim of length 1 is NaN already in eager: the check blamed torch.fx."""
    with pytest.raises(dcopt.TraceError, match="holds NaN or inf") as err:
        dcopt.convert(StdOverOne(), (torch.randn(2, 1, 4),))
    assert "torch.fx records" not in str(err.value)


def _clip_window(ws, size):   # writes into its list argument, as torchvision's Swin3d helper does
    for i in range(2):
        if size[i] < ws[i]:
            ws[i] = size[i]
    return ws


torch.fx.wrap("_clip_window")


class WritesItsListArgument(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.ws = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 4, 1), [8, 8]

    def forward(self, x):
        ws = _clip_window(list(self.ws), x.shape[-2:])
        return self.b(self.a(x).relu()) * ws[0]


def test_a_wrapped_function_that_writes_into_its_list_argument():
    """Shape propagation handed fx's immutable_list to it ("'immutable_list' object does not
    support mutation": every torchvision swin3d failed to analyze); fx's own code passes a
    fresh list."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4)
    dm = dcopt.convert(WritesItsListArgument(), (x,))
    assert_exact_export(dm, (x,), smallest(dm), others=((torch.randn(3, 3, 4, 4),),))
