"""A small Conformer encoder for speech (frame classifier over log-mel features), written
the way speech toolkits write it, usable as a dcopt TARGET::

    dcopt analyze examples/conformer_speech.py
    dcopt check --strict examples/conformer_speech.py

Input: log-mel features (batch, 40 mel bands, frames). Output: per-frame logits
(batch, frames, classes), e.g. for CTC or a keyword spotter.

Each block: half-step feed-forward, multi-head self-attention with its own q/k/v layers
and ``F.scaled_dot_product_attention``, a convolution module (pointwise → GLU →
depthwise → BatchNorm → SiLU → pointwise), half-step feed-forward, LayerNorm; pre-norm
residuals throughout. The widths dcopt learns: the model width ``d_model`` shared by
every residual and LayerNorm (the norms take their statistics over the kept features),
the head width (q and k together, v apart; every head keeps the same features), each
feed-forward's hidden width, and each convolution module's channels.
"""
import torch
import torch.nn.functional as F
from torch import nn

N_MELS = 40


class FeedForward(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, x):
        return self.down(F.silu(self.up(self.norm(x))))


class SelfAttention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(d)
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, t, _ = x.shape
        h = self.norm(x)
        q, k, v = (m(h).view(b, t, self.heads, -1).transpose(1, 2) for m in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, t, -1))


class ConvModule(nn.Module):
    def __init__(self, d: int, channels: int, kernel: int = 15):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.pw1 = nn.Linear(d, 2 * channels)
        self.dw = nn.Conv1d(channels, channels, kernel, padding=kernel // 2, groups=channels)
        self.bn = nn.BatchNorm1d(channels)
        self.pw2 = nn.Linear(channels, d)

    def forward(self, x):
        h = F.glu(self.pw1(self.norm(x)), dim=-1).transpose(1, 2)    # (B, C, T)
        h = F.silu(self.bn(self.dw(h))).transpose(1, 2)
        return self.pw2(h)


class ConformerBlock(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int, channels: int):
        super().__init__()
        self.ff1, self.ff2 = FeedForward(d, ffn), FeedForward(d, ffn)
        self.attn = SelfAttention(d, heads)
        self.conv = ConvModule(d, channels)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        x = x + 0.5 * self.ff1(x)
        x = x + self.attn(x)
        x = x + self.conv(x)
        x = x + 0.5 * self.ff2(x)
        return self.norm(x)


class Conformer(nn.Module):
    def __init__(self, n_mels: int = N_MELS, d: int = 96, heads: int = 4, ffn: int = 192, channels: int = 96,
                 blocks: int = 2, classes: int = 12):
        super().__init__()
        self.subsample = nn.Conv1d(n_mels, d, kernel_size=3, stride=2, padding=1)
        self.blocks = nn.ModuleList(ConformerBlock(d, heads, ffn, channels) for _ in range(blocks))
        self.head = nn.Linear(d, classes)

    def forward(self, x):                           # x: (B, n_mels, T)
        x = F.silu(self.subsample(x)).transpose(1, 2)   # (B, T/2, d)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def build_model() -> nn.Module:
    return Conformer()


def example_inputs():
    return (torch.randn(2, N_MELS, 100),)
