"""Hand-written test models, one per rule family, each with its example inputs."""
from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 24)
        self.fc3 = nn.Linear(24, 4)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class ConvBNHead(nn.Module):
    """conv → BN → ReLU → conv → BN → ReLU → flatten → Linear: each channel becomes a block of H·W."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 10, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(10)
        self.fc = nn.Linear(10 * 4 * 4, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(x, 1))


class CRNN(nn.Module):
    """Conv1d over mel bands → bidirectional stacked GRU → Linear per frame."""

    def __init__(self, rnn=nn.GRU):
        super().__init__()
        self.conv = nn.Conv1d(20, 16, 3, padding=1)
        self.bn = nn.BatchNorm1d(16)
        self.rnn = rnn(16, 12, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(24, 3)

    def forward(self, x):  # x: (B, mels, T)
        x = torch.relu(self.bn(self.conv(x)))
        x = x.transpose(1, 2)
        y, _ = self.rnn(x)
        return self.head(y)


class LSTMModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 10)
        self.lstm = nn.LSTM(10, 14, batch_first=True)
        self.out = nn.Linear(14, 2)

    def forward(self, tokens):
        y, (h, c) = self.lstm(self.emb(tokens))
        return self.out(y[:, -1])


class Residual(nn.Module):
    """ResNet-style block: the residual add couples the stem and the block's last conv."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv1 = nn.Conv2d(16, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        x = torch.relu(x + y)
        return self.fc(x.mean((2, 3)))


class DenseConcat(nn.Module):
    """DenseNet-style: cat on the channel dim gives each group an offset."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 6, 3, padding=1)
        self.c2 = nn.Conv2d(14, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(20)
        self.fc = nn.Linear(20, 3)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.cat([x, torch.relu(self.c1(x))], dim=1)
        x = torch.cat([x, torch.relu(self.c2(x))], dim=1)
        x = torch.relu(self.bn(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class TransformerFFN(nn.Module):
    """LayerNorm → Linear → GELU → Linear + residual: the hidden width is the group."""

    def __init__(self, d=12, hidden=48):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


class DepthwiseSeparable(nn.Module):
    """Depthwise conv passes its input's group through; the pointwise conv consumes it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.dwbn = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 12, 1)
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.dwbn(self.dw(x)))
        x = torch.relu(self.pw(x))
        return self.fc(x.mean((2, 3)))


class LayerScaleSE(nn.Module):
    """Per-channel parameter (C,1,1) and a squeeze-and-excitation multiply."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(16, 1, 1) + 0.5)
        self.se1 = nn.Conv2d(16, 4, 1)
        self.se2 = nn.Conv2d(4, 16, 1)
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        x = torch.relu(self.conv(x)) * self.scale
        s = torch.sigmoid(self.se2(torch.relu(self.se1(x.mean((2, 3), keepdim=True)))))
        return self.fc((x * s).mean((2, 3)))


class SlicedFeatures(nn.Module):
    """A slice on the feature dim and a view with a literal width: both rewritten at export."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 20)
        self.fc2 = nn.Linear(12, 6)
        self.conv = nn.Conv1d(4, 6, 3, padding=1)
        self.fc3 = nn.Linear(6 * 5, 3)

    def forward(self, x, seq):
        a = self.fc2(torch.relu(self.fc1(x))[:, :12])
        b = torch.relu(self.conv(seq)).view(-1, 30)
        return a.sum(1, keepdim=True) + self.fc3(b)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace this
            return self.fc(x)
        return x


def img(b=2, s=8):
    return (torch.randn(b, 3, s, s),)


CASES = {
    "mlp": (MLP, lambda: (torch.randn(4, 16),)),
    "conv_bn_flatten": (ConvBNHead, lambda: img(2, 8)),
    "crnn_gru": (CRNN, lambda: (torch.randn(2, 20, 7),)),
    "crnn_lstm": (lambda: CRNN(nn.LSTM), lambda: (torch.randn(2, 20, 7),)),
    "lstm": (LSTMModel, lambda: (torch.randint(0, 30, (3, 6)),)),
    "residual": (Residual, lambda: img(2, 8)),
    "dense_concat": (DenseConcat, lambda: img(2, 8)),
    "transformer_ffn": (TransformerFFN, lambda: (torch.randn(2, 5, 12),)),
    "depthwise_separable": (DepthwiseSeparable, lambda: img(2, 8)),
    "layerscale_se": (LayerScaleSE, lambda: img(2, 8)),
    "sliced": (SlicedFeatures, lambda: (torch.randn(3, 8), torch.randn(3, 4, 5))),
}


def build(name):
    torch.manual_seed(0)
    ctor, inputs = CASES[name]
    model = ctor()
    _randomize_norm_stats(model)
    return model.eval(), inputs()


def _randomize_norm_stats(model):
    """Non-trivial BN statistics, so slicing the wrong channels would show."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for t, lo, hi in ((m.running_mean, -0.5, 0.5), (m.running_var, 0.5, 2.0),
                                  (m.weight, 0.5, 1.5), (m.bias, -0.5, 0.5)):
                    if t is not None:  # no running stats / affine=False
                        t.uniform_(lo, hi)
