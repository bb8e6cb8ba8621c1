"""A residual block whose `add` is fed by a conv and by an op dcopt has no rule for.

`torch.cumsum` over the channel dimension mixes channels (channel i of the result sums
channels 0..i), so removing a channel of the conv that joins it in the `add` cannot be
made exact: dcopt rejects that group, keeps it at full width, and says where::

    $ dcopt check --strict examples/unsafe_fanin.py     # exit 1, points at the cumsum line

The hidden Linear layer's width can still be learned, so the model is convertible and a
plain `dcopt check` passes; only `--strict` fails on the rejection.
"""
import torch
from torch import nn


class UnsafeFanIn(nn.Module):
    def __init__(self, channels: int = 16, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.hidden = nn.Linear(channels, 32)
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        mixed = torch.cumsum(x, dim=1)          # channel i = sum of channels 0..i: no exact rule
        x = torch.relu(self.conv(x) + mixed)    # the fan-in: a conv output plus the cumsum
        x = x.mean(dim=(2, 3))
        return self.head(torch.relu(self.hidden(x)))


def build_model() -> nn.Module:
    return UnsafeFanIn()


def example_inputs():
    return (torch.randn(2, 3, 16, 16),)
