"""A speech CRNN (convolutions over mel bands, then a bidirectional GRU) usable as a
dcopt TARGET::

    dcopt analyze examples/crnn_speech.py
    dcopt check --strict examples/crnn_speech.py

Input: log-mel features (batch, 40 mel bands, frames). Output: one logit per frame
(e.g. voice activity or a keyword detector's frame score), shape (batch, frames, 1).
The widths dcopt can learn: both conv channel counts and the GRU hidden size.
"""
import torch
from torch import nn

N_MELS = 40


class CRNN(nn.Module):
    def __init__(self, n_mels: int = N_MELS, channels: int = 64, hidden: int = 96, layers: int = 2):
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, channels, kernel_size=5, padding=2)
        self.bn1 = nn.BatchNorm1d(channels)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm1d(channels)
        self.gru = nn.GRU(channels, hidden, num_layers=layers, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, 1)

    def forward(self, x):                       # x: (B, n_mels, T)
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = x.transpose(1, 2)                   # (B, T, C): the GRU reads frames
        x, _ = self.gru(x)                      # (B, T, 2*hidden)
        return self.head(x)                     # (B, T, 1): a logit per frame


def build_model() -> nn.Module:
    return CRNN()


def example_inputs():
    return (torch.randn(2, N_MELS, 100),)


if __name__ == "__main__":
    import dcopt

    print(dcopt.analyze(build_model(), example_inputs()))
