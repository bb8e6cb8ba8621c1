"""torch's TransformerEncoderLayer / TransformerEncoder: dcopt traces their plain computation
(dcopt/traceable.py), so each layer's feed-forward width is a group; the export is torch's
own class with smaller linear1/linear2 and must compute what the gated model computes,
fused eval path included."""
import copy

import pytest
import torch
from torch import nn

import dcopt
from dcopt.numcheck import max_relative_error

from checks import assert_exact_export

D, FF, T = 16, 40, 6


def _encoder(layers=2, *, batch_first=True, norm_first=False, activation="relu", heads=4, nested=False, norm=False):
    layer = nn.TransformerEncoderLayer(D, heads, FF, dropout=0.1, batch_first=batch_first, norm_first=norm_first,
                                       activation=activation)
    return nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(D) if norm else None,
                                 enable_nested_tensor=nested)


class Tagger(nn.Module):
    """Frames in, a label per frame out: input projection → encoder → classifier."""

    def __init__(self, batch_first=True, **kw):
        super().__init__()
        self.batch_first = batch_first
        self.inp = nn.Linear(12, D)
        self.enc = _encoder(batch_first=batch_first, **kw)
        self.out = nn.Linear(D, 3)

    def encode(self, h, **masks):
        if not self.batch_first:
            return self.enc(h.transpose(0, 1), **masks).transpose(0, 1)
        return self.enc(h, **masks)

    def forward(self, x):
        return self.out(self.encode(self.inp(x)))


class PaddedTagger(Tagger):
    def forward(self, x, pad):
        return self.out(self.encode(self.inp(x), src_key_padding_mask=pad))


class MaskedTagger(Tagger):
    def forward(self, x, mask):
        return self.out(self.encode(self.inp(x), mask=mask))


class CausalTagger(Tagger):
    """The causal mask made in the forward from the input's length (a graph value)."""

    def forward(self, x):
        mask = nn.Transformer.generate_square_subsequent_mask(x.size(1))
        return self.out(self.encode(self.inp(x), mask=mask))


class OneLayer(nn.Module):
    """A bare TransformerEncoderLayer (no TransformerEncoder around it), padding mask passed."""

    def __init__(self, norm_first=False):
        super().__init__()
        self.inp = nn.Linear(12, D)
        self.layer = nn.TransformerEncoderLayer(D, 2, FF, batch_first=True, norm_first=norm_first)
        self.out = nn.Linear(D, 3)

    def forward(self, x, pad):
        return self.out(self.layer(self.inp(x), src_key_padding_mask=pad))


def _padding(batch, length, cut):
    pad = torch.zeros(batch, length, dtype=torch.bool)
    pad[0, cut:] = True
    return pad


def _roundtrip(model, example, others):
    """Convert, check the full-width model against the user's (eval, no grad: the user's
    layers take torch's fused path), then several sizes exact on other shapes."""
    state = copy.deepcopy(model.state_dict())
    dm = dcopt.convert(model, example, kappa_min=1 / FF)
    names = [g.name for g in dm.analysis.dynamic_groups]
    model.eval()
    dm.eval()
    with torch.no_grad():
        for xs in (example, *others):
            assert max_relative_error(model(*xs), dm(*xs)) <= 1e-5
    for sizes in ({n: 1 for n in names}, {n: 13 for n in names}, {names[0]: FF, names[-1]: 7},
                  {n: FF for n in names}):
        small = assert_exact_export(dm, example, sizes, others=others)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()), "user's model changed"
    return dm, small


@pytest.mark.parametrize("kw", [
    {},
    {"norm_first": True, "activation": "gelu", "norm": True},
    {"batch_first": False},
    {"heads": 1},                         # odd heads: torch's fused path is off
    {"activation": nn.SiLU()},            # a module activation
])
def test_encoder_feedforward_widths_are_learned_and_exact(kw):
    torch.manual_seed(0)
    model = Tagger(**kw)
    dm, small = _roundtrip(model, (torch.randn(3, T, 12),), [(torch.randn(5, 9, 12),)])
    assert [g.name for g in dm.analysis.dynamic_groups] == ["enc.layers.0.linear1", "enc.layers.1.linear1"]
    # the export is torch's own encoder with smaller feed-forward layers
    assert type(small) is Tagger and type(small.enc) is nn.TransformerEncoder
    assert small.enc.layers[0].linear1.out_features == FF and small.enc.layers[0].linear2.in_features == FF


def test_sizes_shrink_the_exported_layers():
    torch.manual_seed(1)
    dm = dcopt.convert(Tagger(), (torch.randn(2, T, 12),), kappa_min=1 / FF)
    small = assert_exact_export(dm, (torch.randn(2, T, 12),), {"enc.layers.0.linear1": 5, "enc.layers.1.linear1": 9})
    assert [layer.linear1.weight.shape for layer in small.enc.layers] == [(5, D), (9, D)]
    assert [layer.linear2.weight.shape for layer in small.enc.layers] == [(D, 5), (D, 9)]


def test_padding_mask_without_nested_tensors_is_exact():
    torch.manual_seed(2)
    _roundtrip(PaddedTagger(), (torch.randn(3, T, 12), _padding(3, T, 4)),
               [(torch.randn(4, 9, 12), _padding(4, 9, 2))])


def test_attention_masks_given_and_computed_are_exact():
    torch.manual_seed(3)
    causal = nn.Transformer.generate_square_subsequent_mask(T)
    _roundtrip(MaskedTagger(), (torch.randn(2, T, 12), causal),
               [(torch.randn(2, T, 12), torch.zeros(T, T)), (torch.randn(2, T, 12), causal.isinf())])
    dm, _ = _roundtrip(CausalTagger(), (torch.randn(2, T, 12),), [(torch.randn(3, 10, 12),)])
    # the sequence length torch reads for its causal check is a number, not an unknown op
    assert not any("_get_seq_len" in r.reason for r in dm.analysis.rejections)
    assert any("embed_dim" in r.reason for r in dm.analysis.rejections)   # why the stream stays


@pytest.mark.parametrize("norm_first", [False, True])
def test_bare_encoder_layer_with_padding_mask(norm_first):
    torch.manual_seed(4)
    dm, small = _roundtrip(OneLayer(norm_first), (torch.randn(3, T, 12), _padding(3, T, 3)),
                           [(torch.randn(2, 8, 12), _padding(2, 8, 5))])
    assert [g.name for g in dm.analysis.dynamic_groups] == ["layer.linear1"]
    assert type(small.layer) is nn.TransformerEncoderLayer


def test_nested_tensor_path_is_refused_with_the_way_out():
    """With a padding mask, eval without grad, torch runs the encoder on nested tensors:
    zeros at padded positions, which neither a traced copy nor the FLOP counter follows."""
    model = PaddedTagger(nested=True)
    with pytest.raises(dcopt.TraceError, match="enable_nested_tensor=False") as err:
        dcopt.analyze(model, (torch.randn(2, T, 12), _padding(2, T, 3)))
    assert err.value.module == "enc" and "test_transformer.py" in (err.value.location or "")
    # without a padding mask the nested path never runs: converted as usual
    assert len(dcopt.analyze(Tagger(nested=True), (torch.randn(2, T, 12),)).dynamic_groups) == 2


def test_named_leaf_keeps_the_encoder_whole_with_a_reason():
    a = dcopt.analyze(Tagger(), (torch.randn(2, T, 12),), leaf_modules=["enc"])
    assert not a.dynamic_groups or all(not g.name.startswith("enc") for g in a.dynamic_groups)
    assert any("named a leaf module" in r.reason for r in a.rejections)


class OwnFeedForward(nn.TransformerEncoderLayer):
    """A subclass that changes a block torch's plain forward calls (its fused eval path
    ignores the change): dcopt does not trace it as torch's layer; fx fails inside
    torch's forward, and the layer becomes an opaque block, its widths fixed."""

    def _ff_block(self, x):
        return self.dropout2(self.linear2(self.dropout(torch.tanh(self.linear1(x)))))


def test_subclass_with_its_own_block_is_not_traced_through():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(12, D)
            self.layer = OwnFeedForward(D, 2, FF, batch_first=True)

        def forward(self, x):
            return self.layer(self.inp(x))

    a = dcopt.analyze(M(), (torch.randn(2, T, 12),))
    assert not any(g.name.startswith("layer") for g in a.dynamic_groups)
    assert any("opaque block layer (OwnFeedForward)" in r.reason for r in a.rejections)


def test_fit_trains_the_feedforward_widths():
    """The optimize phase's noise reaches linear1's features: sizes move, and the export
    after training is exact."""
    torch.manual_seed(5)
    x = torch.randn(64, T, 12)
    y = torch.randn(64, T, 3)
    data = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    dm = dcopt.convert(Tagger(), (x[:2],), beta=5.0)
    before = dm.kept_sizes()
    dcopt.fit(dm, data, nn.functional.mse_loss, fixed_epochs=1, optimize_epochs=3, settle_epochs=1,
              lr=1e-2, size_lr=0.5, progress=False)
    assert dm.kept_sizes() != before
    assert_exact_export(dm, (x[:2],), others=[(x[4:9, :5],)])


def test_a_bare_encoder_layer_as_the_model_says_to_wrap_it():
    """fx traces the root's forward itself: the way out is a wrapper module."""
    with pytest.raises(dcopt.TraceError, match="wrap it"):
        dcopt.analyze(nn.TransformerEncoderLayer(D, 2, FF, batch_first=True), (torch.randn(2, T, D),))

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.TransformerEncoderLayer(D, 2, FF, batch_first=True)

        def forward(self, x):
            return self.layer(x)

    assert [g.name for g in dcopt.analyze(Wrapper(), (torch.randn(2, T, D),)).dynamic_groups] == ["layer.linear1"]


class Seq2Seq(nn.Module):
    """nn.Transformer between two input projections; the decoder's causal mask computed."""

    def __init__(self, causal="mask"):
        super().__init__()
        self.causal = causal
        self.src = nn.Linear(12, D)
        self.tgt = nn.Linear(5, D)
        self.tf = nn.Transformer(D, 2, num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=FF,
                                 batch_first=True)
        self.out = nn.Linear(D, 5)

    def forward(self, x, y):
        if self.causal == "mask":
            mask = nn.Transformer.generate_square_subsequent_mask(y.size(1))
            h = self.tf(self.src(x), self.tgt(y), tgt_mask=mask)
        else:
            h = self.tf(self.src(x), self.tgt(y), tgt_mask=None, tgt_is_causal=False)
        return self.out(h)


@pytest.mark.parametrize("causal", ["mask", "none"])
def test_encoder_decoder_transformer(causal):
    torch.manual_seed(6)
    dm, small = _roundtrip(Seq2Seq(causal), (torch.randn(2, T, 12), torch.randn(2, 4, 5)),
                           [(torch.randn(3, 9, 12), torch.randn(3, 7, 5))])
    assert [g.name for g in dm.analysis.dynamic_groups] == [
        "tf.encoder.layers.0.linear1", "tf.decoder.layers.0.linear1", "tf.decoder.layers.1.linear1"]
    assert type(small.tf) is nn.Transformer


def test_decoder_with_memory_from_a_dynamic_encoder_stack():
    """A decoder stack alone (memory given), its layers' widths learned."""
    class Dec(nn.Module):
        def __init__(self):
            super().__init__()
            self.dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(D, 2, FF, batch_first=True, norm_first=True),
                                             2, norm=nn.LayerNorm(D))

        def forward(self, y, memory, pad):
            return self.dec(y, memory, tgt_key_padding_mask=pad, tgt_is_causal=None)

    torch.manual_seed(7)
    dm, _ = _roundtrip(Dec(), (torch.randn(2, T, D), torch.randn(2, 3, D), _padding(2, T, 4)),
                       [(torch.randn(3, 5, D), torch.randn(3, 8, D), _padding(3, 5, 2))])
    assert len(dm.analysis.dynamic_groups) == 2


@pytest.mark.parametrize("swap", ["gelu_tanh", "replaced"])
def test_activation_the_fused_path_ignores_keeps_that_layer_whole(swap):
    """torch's fused eval path applies ReLU or erf-GELU by a flag set at construction:
    GELU(approximate='tanh'), or an activation swapped afterwards, computes other numbers
    in eval without grad than in training. That layer stays whole (with the reason); the
    other layer's width is still learned, and the conversion is exact."""
    torch.manual_seed(8)
    model = Tagger()
    if swap == "gelu_tanh":
        model.enc.layers[1] = nn.TransformerEncoderLayer(D, 4, FF, batch_first=True,
                                                         activation=nn.GELU(approximate="tanh"))
    else:
        model.enc.layers[1].activation = nn.functional.silu
    dm, _ = _roundtrip(model, (torch.randn(3, T, 12),), [(torch.randn(2, 9, 12),)])
    assert [g.name for g in dm.analysis.dynamic_groups] == ["enc.layers.0.linear1"]
    assert any("fused eval path applies" in r.reason for r in dm.analysis.rejections)


def test_a_layer_of_the_users_own_inside_an_encoder():
    """The encoder calls its layers as modules: a user's layer in the stack is traced as
    its own code, and torch's layers around it keep their learned widths."""
    class Own(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(D, D)

        def forward(self, src, src_mask=None, is_causal=None, src_key_padding_mask=None):
            return src + self.lin(src)

    torch.manual_seed(9)
    model = Tagger()
    model.enc.layers[1] = Own()
    dm, _ = _roundtrip(model, (torch.randn(3, T, 12),), [(torch.randn(2, 9, 12),)])
    assert [g.name for g in dm.analysis.dynamic_groups] == ["enc.layers.0.linear1"]
    assert not any("named a leaf" in r.reason for r in dm.analysis.rejections)
