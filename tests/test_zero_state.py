"""RNNs given all-zero initial states the forward builds itself (``torch.zeros(L, B, H)``,
the tutorial pattern) learn their hidden size like RNNs given none (dcopt/zero_state.py)."""
import pytest
import torch
from torch import nn

import dcopt
from dcopt.numcheck import max_relative_error

from checks import assert_exact_export

H = 12


class Tagger(nn.Module):
    def __init__(self, how, cell="GRU", bidirectional=False):
        super().__init__()
        self.how, self.cell = how, cell
        self.inp = nn.Linear(6, 10)
        self.rnn = getattr(nn, cell)(10, H, num_layers=2, batch_first=True, bidirectional=bidirectional)
        if how in ("zeros_like", "learned", "learned_both", "learned_literal"):   # only where the forward reads it (an unused one is counted apart)
            self.h0 = nn.Parameter(torch.randn(self.rnn.num_layers * (2 if bidirectional else 1), 1, H))
        self.out = nn.Linear(H * (2 if bidirectional else 1), 3)

    def forward(self, x):
        layers = self.rnn.num_layers * (2 if self.rnn.bidirectional else 1)
        if self.how == "zeros":
            h0 = torch.zeros(layers, x.size(0), self.rnn.hidden_size)
        elif self.how == "new_zeros_to":
            h0 = x.new_zeros(layers, x.size(0), H).to(x.device).contiguous()
        elif self.how == "zeros_like":
            h0 = torch.zeros_like(self.h0.expand(-1, x.size(0), -1))
        elif self.how == "learned_literal":   # H written as a number: export would not rewrite it
            h0 = self.h0.expand(layers, x.size(0), H)
        else:   # "learned": a trained initial state is not zeros
            h0 = self.h0.expand(-1, x.size(0), -1).contiguous()
        if self.how == "learned_both" and self.cell == "LSTM":
            return self.out(self.rnn(self.inp(x), (h0, h0))[0])
        if self.cell == "LSTM":
            state = (h0, h0) if self.how == "zeros" else (h0, torch.zeros_like(h0))
        else:
            state = h0
        return self.out(self.rnn(self.inp(x), state)[0])


X = (torch.randn(2, 5, 6),)
OTHERS = [(torch.randn(3, 9, 6),), (torch.randn(1, 2, 6),)]


def _exact(model, sizes=(1, 5, H)):
    dm = dcopt.convert(model, X, kappa_min=1 / H)
    model.eval()
    with torch.no_grad():
        for xs in (X, *OTHERS):
            assert max_relative_error(model(*xs), dm.eval()(*xs)) == 0.0   # the same computation, bit for bit
    exported = {n: assert_exact_export(dm, X, {"rnn": n}, others=OTHERS) for n in sizes}
    return dm, exported


@pytest.mark.parametrize("cell", ["GRU", "LSTM"])
@pytest.mark.parametrize("how", ["zeros", "new_zeros_to", "zeros_like"])
def test_zero_initial_state_lets_the_hidden_size_be_learned(cell, how, recwarn):
    dm, exported = _exact(Tagger(how, cell))
    assert not [w for w in recwarn if "erase_node" in str(w.message)]   # one zeros node as h0 and c0
    assert "rnn" in dm.group_names
    # zeros sized by ``self.rnn.hidden_size`` follow the exported GRU: your class is kept;
    # zeros sized by a literal would not: the traced graph (without them) is exported
    kept_class = isinstance(exported[5], Tagger)
    assert kept_class == (how == "zeros"), type(exported[5])


def test_bidirectional_zero_state():
    assert "rnn" in _exact(Tagger("zeros", "GRU", bidirectional=True))[0].group_names


@pytest.mark.parametrize("cell, how, bidirectional", [("GRU", "learned", False), ("GRU", "learned", True),
                                                      ("LSTM", "learned", False), ("LSTM", "learned_both", True)])
def test_a_learned_initial_state_is_sliced_with_the_units(cell, how, bidirectional):
    """A removed unit starts from its learned value but never reaches a kept one (its
    columns are masked inside the recurrence) and its outputs are gated: exact. An LSTM's
    c0 of zeros beside a learned h0 is a fixed tensor: it keeps the width."""
    model = Tagger(how, cell, bidirectional)
    if cell == "LSTM" and how == "learned":
        a = dcopt.analyze(model, X)
        assert a.group("rnn").status != "dynamic"
        assert any("initial hidden state" in r for r in a.group("rnn").reasons)
        return
    dm, exported = _exact(model)
    assert "rnn" in dm.group_names
    assert exported[5].get_parameter("h0").shape[-1] == 5 and exported[5].get_submodule("rnn").hidden_size == 5


def test_a_learned_state_expanded_to_a_literal_width_keeps_it():
    a = dcopt.analyze(Tagger("learned_literal"), X)
    assert a.group("rnn").status != "dynamic"


class HalfZero(nn.Module):
    """An LSTM's (h0, c0) with only c0 zeros: the state is not dropped."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(6, H, batch_first=True)
        self.h0 = nn.Parameter(torch.randn(1, 1, H))
        self.out = nn.Linear(H, 3)

    def forward(self, x):
        h0 = self.h0.expand(-1, x.size(0), -1).contiguous()
        return self.out(self.rnn(x, (h0, torch.zeros(1, x.size(0), H)))[0])


def test_lstm_state_half_zeros_is_kept():
    a = dcopt.analyze(HalfZero(), X)
    assert a.group("rnn").status != "dynamic"


class SharedZeros(nn.Module):
    """The zeros also feed another op (added to the output), and the model calls a
    BatchNorm whose result it never uses (its statistics still update in training):
    both stay in the graph."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(6, H, batch_first=True)
        self.bn = nn.BatchNorm1d(6)
        self.out = nn.Linear(H, 3)

    def forward(self, x):
        z = torch.zeros(1, x.size(0), H)
        self.bn(x.transpose(1, 2))
        y = self.out(self.rnn(x, z)[0])
        return y + z.sum()


def test_other_users_of_the_zeros_and_unused_calls_stay():
    dm, _ = _exact(SharedZeros())
    targets = [n.target for n in dm.gm.graph.nodes]
    assert torch.zeros in targets and "bn" in targets


class LearnedWhenNone(nn.GRU):
    """A user's GRU for which no state means "start from a learned state": its zeros
    are not the same as none, so they stay (the GRU keeps its width)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h_init = nn.Parameter(torch.ones(1, 1, self.hidden_size))

    def forward(self, x, hx=None):
        if hx is None:
            hx = self.h_init.expand(1, x.size(0), -1).contiguous()
        return super().forward(x, hx)


class SubclassTagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = LearnedWhenNone(6, H, batch_first=True)
        self.out = nn.Linear(H, 3)

    def forward(self, x):
        return self.out(self.rnn(x, torch.zeros(1, x.size(0), H))[0])


def test_a_subclass_with_its_own_forward_keeps_its_zero_state():
    model = SubclassTagger()
    dm = dcopt.convert(model, X)   # was: the full-width check failed (the state had been dropped)
    with torch.no_grad():
        assert max_relative_error(model.eval()(*X), dm.eval()(*X)) == 0.0
