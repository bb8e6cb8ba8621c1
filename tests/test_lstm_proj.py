"""An LSTM with ``proj_size`` (LSTMP, common in speech recognition): the features feeding
it are learned (``weight_ih_l0``'s columns are sliced, as a Linear's); its own widths stay,
and its MACs, 4·H·(I+P) + P·H per step, follow the input width."""
import pytest
import torch
from torch import nn

import dcopt
from dcopt.numcheck import max_relative_error

from checks import assert_exact_export


class Lstmp(nn.Module):
    def __init__(self, layers=1, bidirectional=False, batch_first=True):
        super().__init__()
        self.batch_first = batch_first
        self.conv = nn.Conv1d(5, 12, 3, padding=1)
        self.lstm = nn.LSTM(12, 10, num_layers=layers, bidirectional=bidirectional, proj_size=4,
                            batch_first=batch_first)
        self.out = nn.Linear(4 * (2 if bidirectional else 1), 3)

    def forward(self, x):                      # x: (B, 5, T)
        h = torch.relu(self.conv(x)).transpose(1, 2)
        if not self.batch_first:
            h = h.transpose(0, 1)
        y, _ = self.lstm(h)
        if not self.batch_first:
            y = y.transpose(0, 1)
        return self.out(y)


X = (torch.randn(2, 5, 7),)
OTHERS = [(torch.randn(3, 5, 11),), (torch.randn(1, 5, 1),)]


@pytest.mark.parametrize("layers, bidirectional, batch_first", [(1, False, True), (2, True, True), (2, False, False)])
def test_the_features_feeding_a_projected_lstm_are_learned(layers, bidirectional, batch_first):
    torch.manual_seed(0)
    model = Lstmp(layers, bidirectional, batch_first)
    dm = dcopt.convert(model, X, kappa_min=0.01)
    assert dm.group_names == ["conv"]
    model.eval()
    with torch.no_grad():
        assert max_relative_error(model(*X), dm.eval()(*X)) <= 1e-6
    for n in (1, 5, 12):
        small = assert_exact_export(dm, X, {"conv": n}, others=OTHERS)
        assert small.lstm.input_size == n and small.lstm.weight_ih_l0.shape == (40, n)
        assert small.lstm.proj_size == 4 and small.lstm.hidden_size == 10


def test_the_projected_lstm_s_own_widths_stay():
    a = dcopt.analyze(Lstmp(), X)
    assert [g.name for g in a.dynamic_groups] == ["conv"] and a.roles["lstm"] == "ACL"
