"""The recurrent half of the feature noise: per-step noise on an RNN's boundary unit.

The FeatureGate on an RNN's output puts noise on the boundary unit m only where the next
layer reads it. Removing the unit also removes what h_m(t−1) feeds every unit's gates at
every step, which on the trained VAD CRNN is most of its value (README, "RNN hidden
units"). The fused kernels (``torch.gru`` & co.) take no noise on h inside the loop, but
everything h_m(t−1) feeds goes through column m of ``weight_hh``, a linear map *before*
any nonlinearity. So the noise goes in through the input instead: each layer's input gets
extra channels ν(t) ~ N(0, 1), fresh per step and sample, read by

    column m of weight_hh   ← √λ · column m                       (the unit's clean share)
    extra column of weight_ih = √(1−λ) · σ_m · (column m of weight_hh)   (its noise share)

which makes every gate see √λ·h_m(t−1) + √(1−λ)·σ_m·ν(t) in place of h_m(t−1), exactly
the FeatureGate's rule, at the cost of one more input column per direction (a stacked
layer one more per direction of the layer below; padded with zero columns to a multiple
of 8: CPU GEMMs on odd input widths are slower). The unit's own carry (the
GRU's z_m·h_m(t−1), the LSTM's cell state) stays clean. σ_m is the std of h_m over
batch and time, taken from the previous forward (before the first, a clean pass without
gradients measures it). A stacked layer also gets the same per-step noise on
the previous layer's unit m where it reads it (its ``weight_ih`` columns m + d·H).

Exact for LSTM and the plain RNN (h enters only through ``weight_hh @ h``). For the GRU the
candidate gate reads r ⊙ (W_hn h + b_hn): the noise enters it without the factor r. The
estimate of the unit's recurrent value is then a little high for the candidate block; the
reset and update gates get it exactly.

Training with noise only; eval keeps the exact mask, so eval mode still equals the export.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

__all__ = ["step_noise_forward"]

_OPS = {"GRU": torch.gru, "LSTM": torch.lstm, "RNN_TANH": torch.rnn_tanh, "RNN_RELU": torch.rnn_relu}


def _column_noise(w: torch.Tensor, col: int, scale: torch.Tensor, sigma) -> tuple[torch.Tensor, torch.Tensor]:
    """(w with column ``col`` scaled by √λ, the noise channel's weights √(1−λ)·σ·column);
    zeros for the channel while σ is unknown (the clean pass that first measures it)."""
    root_l, root_1l = scale
    column = w[:, col]
    is_col = torch.zeros(w.shape[1], dtype=torch.bool, device=w.device)
    is_col[col] = True
    scaled = torch.where(is_col, w * root_l, w)
    extra = column * (root_1l * sigma) if sigma is not None else torch.zeros_like(column)
    return scaled, extra


@dataclass
class SigmaCache:
    """What the recurrent noise keeps between forwards, per layer of one RNN: the std of
    each unit's output over batch and time (``std[layer]``, [D, H]) and the boundary unit it
    was last updated at (``boundary[layer]``)."""
    std: dict = field(default_factory=dict)
    boundary: dict = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.std)

    def state(self) -> dict:
        """A copy as plain data (``fit``'s checkpoint, read with ``weights_only=True``)."""
        return {"std": {k: v.clone() for k, v in self.std.items()}, "boundary": dict(self.boundary)}

    def load(self, state: dict) -> None:
        """Replace the cache by ``state`` (from :meth:`state`; also the earlier layout,
        layer → std beside "m" → layer → boundary)."""
        if "std" not in state:
            state = {"std": {k: v for k, v in state.items() if k != "m"}, "boundary": state.get("m", {})}
        self.std = {k: v.clone() for k, v in state["std"].items()}
        self.boundary = dict(state["boundary"])


def _update_sigma(cache: SigmaCache, layer: int, out: torch.Tensor, m: int) -> None:
    """σ of each unit's output over batch and time (``cache.std[layer]``). After a full
    measurement only the boundary unit and its neighbours are updated, the units the next
    forward can put noise on (the whole tensor's std costs several ms per forward on CPU);
    when the boundary jumps further (``set_sizes``, a backtrack) all of them again."""
    last = cache.boundary.get(layer)
    full = layer not in cache.std or last is None or abs(m - last) > 1
    units = slice(None) if full else slice(max(m - 1, 0), m + 2)
    cols = out[..., units]
    std = (cols - cols.mean(0)).pow(2).mean(0).sqrt()
    if not full:                       # a new tensor: this forward's graph holds the old one's σ_m
        idx = torch.arange(units.start, units.start + std.shape[1], device=std.device)
        std = cache.std[layer].clone().index_copy_(1, idx, std)
    cache.std[layer] = std
    cache.boundary[layer] = m


def step_noise_forward(rnn: nn.RNNBase, params: dict, m: int, lam: torch.Tensor, cache: SigmaCache, x, hx=None):
    """``rnn`` run layer by layer on ``params`` (its masked weights) with per-step noise on
    boundary unit ``m`` (share ``lam``); ``cache`` keeps each layer's per-unit output std
    between forwards. Same outputs as ``rnn(x, hx)`` in layout."""
    if any(layer not in cache.std for layer in range(rnn.num_layers)):   # first noisy forward: σ from a clean pass
        with torch.no_grad():
            _layer_by_layer(rnn, params, m, torch.ones_like(lam), cache, x, hx)
    return _layer_by_layer(rnn, params, m, lam, cache, x, hx)


def _layer_by_layer(rnn: nn.RNNBase, params: dict, m: int, lam: torch.Tensor, cache: SigmaCache, x, hx):
    H, L = rnn.hidden_size, rnn.num_layers
    D = 2 if rnn.bidirectional else 1
    lstm = rnn.mode == "LSTM"
    op = _OPS[rnn.mode]
    packed = isinstance(x, PackedSequence)
    batch_first = rnn.batch_first and not packed
    if packed:
        data, batch_sizes, sorted_idx, unsorted_idx = x
        B = int(batch_sizes[0])
        unbatched = False
    else:
        unbatched = x.dim() == 2
        data = x.unsqueeze(0 if batch_first else 1) if unbatched else x
        B = data.shape[0 if batch_first else 1]
        sorted_idx = unsorted_idx = None
    if hx is None:
        z = data.new_zeros(L * D, B, H)
        hx = (z, z) if lstm else z
    elif unbatched:
        hx = tuple(h.unsqueeze(1) for h in hx) if lstm else hx.unsqueeze(1)
    elif packed:
        hx = rnn.permute_hidden(hx, sorted_idx)
    scale = (lam.sqrt(), (1 - lam).sqrt())
    inp, h_n, c_n = data, [], []
    for layer in range(L):
        own, prev = cache.std.get(layer), cache.std.get(layer - 1)
        n_in = D if layer > 0 else 0
        pad = -(inp.shape[-1] + D + n_in) % 8   # zero channels: CPU GEMMs on input widths of 8k run faster
        flat = []
        for d, sfx in enumerate(["", "_reverse"][:D]):
            w_ih, w_hh = params[f"weight_ih_l{layer}{sfx}"], params[f"weight_hh_l{layer}{sfx}"]
            w_hh, rec = _column_noise(w_hh, m, scale, own[d, m] if own is not None else None)
            extras = [rec if e == d else torch.zeros_like(rec) for e in range(D)]
            for e in range(n_in):                   # the previous layer's unit m, direction e
                w_ih, col = _column_noise(w_ih, m + e * H, scale, prev[e, m] if prev is not None else None)
                extras.append(col)
            extras += [torch.zeros_like(rec)] * pad
            flat += [torch.cat([w_ih, torch.stack(extras, 1)], 1), w_hh]
            if rnn.bias:
                flat += [params[f"bias_ih_l{layer}{sfx}"], params[f"bias_hh_l{layer}{sfx}"]]
        noise = torch.randn(*inp.shape[:-1], D + n_in, dtype=inp.dtype, device=inp.device)
        inp_ext = torch.cat([inp, noise, inp.new_zeros(*inp.shape[:-1], pad)], -1)
        sl = slice(layer * D, (layer + 1) * D)
        h0 = (hx[0][sl], hx[1][sl]) if lstm else hx[sl]
        if packed:
            res = op(inp_ext, batch_sizes, h0, flat, rnn.bias, 1, 0.0, True, D == 2)
        else:
            res = op(inp_ext, h0, flat, rnn.bias, 1, 0.0, True, D == 2, batch_first)
        out = res[0]
        h_n.append(res[1])
        if lstm:
            c_n.append(res[2])
        _update_sigma(cache, layer, out.detach().reshape(-1, D, H), m)
        inp = nn.functional.dropout(out, rnn.dropout, True) if layer < L - 1 and rnn.dropout else out
    hidden = (torch.cat(h_n), torch.cat(c_n)) if lstm else torch.cat(h_n)
    if packed:
        return PackedSequence(inp, batch_sizes, sorted_idx, unsorted_idx), rnn.permute_hidden(hidden, unsorted_idx)
    if unbatched:
        inp = inp.squeeze(0 if batch_first else 1)
        hidden = tuple(h.squeeze(1) for h in hidden) if lstm else hidden.squeeze(1)
    return inp, hidden
