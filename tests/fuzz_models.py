"""Random architectures for fuzzing the graph machinery (seed → model), and the check
each one answers to.

:func:`generate` builds a small float64 model from a seed: a sequence, image or
image→sequence stack of random blocks (linear, conv 1d/2d with every groups form,
transposed and depthwise transposed, norms over every dim, residuals, cat and split on
every dim, SE gates, expand/broadcast, reshapes with literal, -1 and read sizes,
permutes, slices, GRU/LSTM with initial and passed-on states, attention-like matmuls,
in-place ops, pooling, interpolation, auxiliary outputs) and inputs of other batch
sizes and lengths. :func:`check_case` converts it and checks every invariant of
DESIGN.md by numbers: full width == the user's model (eval, and train mode in the
fixed phase); at three size vectors the export == the eval-mode gated model on the
example and the other inputs, with MACs and parameters as predicted; reordering keeps
the function; the user's model is unchanged. A rejection is never a failure; a
difference, a crash or a mutation is. Written as a red-team fuzzer (it found the
flattened-slice and dead-call bugs fixed with it); ``tests/test_fuzz.py`` runs it.
"""
from __future__ import annotations

import copy
import random
import traceback

import torch
import torch.nn.functional as F
from torch import nn

torch.set_num_threads(1)
import dcopt  # noqa: E402
from dcopt.numcheck import max_relative_error  # noqa: E402

ACTS = ["relu", "gelu", "tanh", "none"]


def act(name, x):
    if name == "relu":
        return torch.relu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "tanh":
        return torch.tanh(x)
    return x


def rand_bn(bn):
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
        if bn.weight is not None:
            bn.weight.normal_(1, 0.3)
            bn.bias.normal_(0, 0.3)
    return bn


# --------------------------------------------------------------------------------------
# one generic block; forward dispatches on constant attributes (fx-traceable)
# --------------------------------------------------------------------------------------
class Blk(nn.Module):
    def __init__(self, kind, var, **kw):
        super().__init__()
        self.kind = kind
        self.var = var
        self.kw = kw

    def extra_repr(self):
        return f"{self.kind}/{self.var} {self.kw}"

    # ---- sequence blocks: x (B, T, C) ----
    def forward(self, x):
        k, v, kw = self.kind, self.var, self.kw
        if k == "linear":
            return act(kw["act"], self.m(x))
        if k == "conv1d":
            if v == "transpose":
                y = x.transpose(1, 2)
            elif v == "permute":
                y = x.permute(0, 2, 1)
            else:
                y = torch.movedim(x, -1, 1)
            y = act(kw["act"], self.m(y))
            if kw.get("bn"):
                y = self.bn(y)
            if v == "movedim":
                return y.movedim(1, 2)
            return y.transpose(1, 2)
        if k == "bn_feat":
            return self.m(x.transpose(1, 2)).transpose(1, 2)
        if k == "bn_time":  # BatchNorm1d over T: channels = time steps
            return self.m(x)
        if k == "ln_time":
            return self.m(x.transpose(1, 2)).transpose(1, 2)
        if k == "ln_feat":
            return self.m(x)
        if k == "gn":
            return self.m(x.permute(0, 2, 1)).permute(0, 2, 1)
        if k == "res":
            y = self.f2(torch.relu(self.f1(x)))
            if v == "add":
                return x + y
            if v == "radd":
                return y + x
            if v == "sub":
                return x - y
            if v == "torch_add":
                return torch.add(x, y, alpha=0.5)
            if v == "iadd":
                y += x
                return y
            if v == "add_":
                y = y.add_(x)
                return y
            return x * y
        if k == "res_proj":
            y = self.f2(torch.relu(self.f1(x)))
            return self.p(x) + y
        if k == "cat_feat":
            y = act(kw["act"], self.m(x))
            if v == "xfirst":
                return torch.cat([x, y], -1)
            if v == "yfirst":
                return torch.cat((y, x), dim=2)
            return torch.cat([y, x, y], -1)
        if k == "cat_time":
            if v == "x_x0":
                return torch.cat([x, x[:, :1]], 1)
            y = self.m(x)
            if v == "xy":
                return torch.cat([x, y], 1)
            if v == "yx":
                return torch.cat([y, x], dim=1)
            return torch.cat([x, x[:, :1]], 1)
        if k == "chunk_time":
            if v == "chunk":
                a, b = x.chunk(2, 1)
            elif v == "split":
                a, b = torch.split(x, [kw["s"], x.size(1) - kw["s"]], dim=1)
            else:
                a, b = x.tensor_split(2, dim=1)
            return torch.cat([b, a * 2.0], 1)
        if k == "heads":   # hand-written multi-head self-attention
            bs, ts, heads, dh = x.size(0), x.size(1), kw["heads"], kw["dh"]

            def split(h):
                if v == "minus_one":
                    return h.view(bs, -1, heads, dh).transpose(1, 2)
                if v == "unflatten":
                    return h.unflatten(-1, (heads, dh)).transpose(1, 2)
                return h.view(bs, ts, heads, dh).transpose(1, 2)
            q, kk, vv = split(self.q(x)), split(self.k(x)), split(self.v(x))
            if v == "sdpa":            # torch's default scale 1/sqrt(dh): written into the export
                y = F.scaled_dot_product_attention(q, kk, vv)
            elif v == "sdpa_causal":
                y = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, scale=kw["scale"])
            elif v == "einsum":
                a = torch.softmax(torch.einsum("bhid,bhjd->bhij", q, kk) * kw["scale"], dim=-1)
                y = torch.einsum("bhij,bhjd->bhid", a, vv)
            else:
                y = torch.softmax(q @ kk.transpose(-2, -1) * kw["scale"], dim=-1) @ vv
            return self.o(y.transpose(1, 2).reshape(bs, ts, heads * dh))
        if k == "chunk_feat":
            if v == "chunk":
                a, b = x.chunk(2, -1)
            else:
                a, b = torch.split(x, [kw["s"], kw["c"] - kw["s"]], dim=-1)
            if kw["swap"]:
                return torch.cat([torch.relu(b), a], -1)
            return torch.cat([torch.relu(a), torch.sigmoid(b)], -1)
        if k == "se":
            s = torch.sigmoid(self.f2(torch.relu(self.f1(x.mean(1)))))
            if v == "unsqueeze":
                s = s.unsqueeze(1)
            elif v == "none_index":
                s = s[:, None, :]
            elif v == "view_lit":
                s = s.view(s.size(0), 1, kw["c"])
            elif v == "reshape_m1":
                s = s.reshape(s.size(0), 1, -1)
            return x * s
        if k == "expand":
            m = x.mean(1, keepdim=True)
            if v == "expand":
                m = m.expand(-1, x.size(1), -1)
            elif v == "expand_as":
                m = m.expand_as(x)
            elif v == "expand_lit":
                m = m.expand(x.size(0), x.size(1), kw["c"])
            elif v == "broadcast_to":
                m = torch.broadcast_to(m, x.shape)
            return x - m
        if k == "bparam":
            if v == "gamma":
                return x * self.gamma
            if v == "time_bias":
                return x + self.tb
            if v == "buffer":
                return x * self.buf
            return x + self.gamma.view(1, 1, -1)
        if k == "reshape_bt":
            b, t = x.size(0), x.size(1)
            if v == "reshape_m1":
                y = x.reshape(-1, x.size(-1))
            elif v == "reshape_lit":
                y = x.reshape(-1, kw["c"])
            else:
                y = x.flatten(0, 1)
            y = self.m(y)
            return y.view(b, t, -1)
        if k == "unflat":
            if v == "feat":
                return torch.relu(x.unflatten(-1, (kw["c"], 1))).flatten(-2)
            if v == "time":
                return x.unflatten(1, (x.size(1), 1)).squeeze(2)
            return x.reshape(x.size(0), x.size(1), kw["c"] // kw["g"], kw["g"]).sum(-1)
        if k == "perm":
            if v == "permute":
                return x.permute(0, 2, 1).contiguous().permute(0, 2, 1)
            if v == "movedim":
                return x.movedim(-1, 0).relu().movedim(0, -1)
            if v == "tb":
                return x.transpose(0, 1).tanh().transpose(0, 1)
            return x.mT.mT
        if k == "unsq":
            if v == "1":
                return x.unsqueeze(1).squeeze(1)
            if v == "-1":
                return torch.unsqueeze(x, -1).relu().squeeze(-1)
            return x.unsqueeze(0).squeeze(0)
        if k == "slice_feat":
            a, b, st = kw["a"], kw["b"], kw["st"]
            if v == "ellipsis":
                return x[..., a:b:st]
            if v == "full":
                return x[:, :, a:b:st]
            return x.narrow(-1, a, b - a)
        if k == "slice_time":
            a, b, st = kw["a"], kw["b"], kw["st"]
            if v == "slice":
                return x[:, a:b:st]
            return x.narrow(1, a, b - a)
        if k == "rnn":
            if v == "time_first":
                return self.m(x.transpose(0, 1))[0].transpose(0, 1)
            return self.m(x)[0]
        if k == "rnn_h0":
            B = x.size(0)
            h = torch.tanh(self.h0(x.mean(1)))
            h = h.view(B, kw["ld"], kw["h"]).transpose(0, 1).contiguous()
            if kw["lstm"]:
                return self.m(x, (h, torch.zeros_like(h)))[0]
            return self.m(x, h)[0]
        if k == "rnn_state":
            o1, st = self.m(x)
            o2, _ = self.m2(o1 if v == "chain" else x, st)
            return o2
        if k == "ew_const":
            if v == "affine":
                return x * 2.5 + 1.0
            if v == "clamp":
                return torch.clamp(x, -1.0, 1.0)
            if v == "pow":
                return x.pow(2) - x
            if v == "rsub":
                return 1.0 - x
            if v == "div":
                return x / 3.0
            if v == "where":
                return torch.where(x > 0, x, 0.1 * x)
            return torch.exp(-x.abs())
        if k == "ew_bcast":
            if v == "amax_t":
                return x * x.amax(1, keepdim=True)
            if v == "sum_t":
                return x + x.sum(1, keepdim=True)
            if v == "std_t":
                return x / (x.std(1, keepdim=True) + 1.0)
            return x + x.mean(-1, keepdim=True)  # over features: should be rejected
        if k == "attn":
            q, kk, vv = self.q(x), self.k(x), self.v(x)
            if v == "matmul":
                a = torch.softmax(q @ kk.transpose(-1, -2) * 0.5, dim=-1)
                return a @ vv
            if v == "bmm":
                a = torch.softmax(torch.bmm(q, kk.transpose(1, 2)), -1)
                return torch.bmm(a, vv)
            if v == "sdpa":
                return F.scaled_dot_product_attention(q, kk, vv)
            a = torch.einsum("btc,bsc->bts", q, kk).softmax(-1)
            return torch.einsum("bts,bsc->btc", a, vv)
        if k == "inplace":
            y = self.m(x)
            if v == "relu_":
                y.relu_()
                return y
            if v == "F_inplace":
                return F.relu(y, inplace=True)
            if v == "mul_":
                y.mul_(2.0)
                return y
            if v == "iadd":
                y += 1.0
                return y
            y.clamp_(min=-0.5)
            return y
        if k == "pool_time":
            y = x.transpose(1, 2)
            if v == "avg":
                y = F.avg_pool1d(y, 2)
            elif v == "max":
                y = F.max_pool1d(y, 2)
            elif v == "adaptive":
                y = F.adaptive_avg_pool1d(y, kw["t"])
            else:
                y = self.m(y)
            return y.transpose(1, 2)
        if k == "interp_time":
            y = x.transpose(1, 2)
            if v == "scale":
                y = F.interpolate(y, scale_factor=2.0)
            elif v == "linear":
                y = F.interpolate(y, scale_factor=2.0, mode="linear", align_corners=False)
            else:
                y = F.interpolate(y, size=kw["t"])
            return y.transpose(1, 2)
        if k == "chain":
            y = x
            for sb in self.sub:
                y = sb(y)
            if v == "add":
                return x + y
            if v == "cat":
                return torch.cat([y, x], -1)
            if v == "gate":
                return x * torch.sigmoid(y)
            if v == "proj":
                return self.p(y) + x
            return y
        if k == "chain2d":
            y = x
            for sb in self.sub:
                y = sb(y)
            if v == "add":
                return x + y
            if v == "cat":
                return torch.cat([x, y], 1)
            return self.p(y) + x
        if k == "stack_flat":
            if v == "feat":
                return torch.stack([x, torch.relu(x)], -1).flatten(-2)
            if v == "time":
                return torch.stack([x, x * 0.5], 2).flatten(1, 2)
            return sum(x.unbind(1))[:, None, :] + x
        if k == "h0_zeros":
            if kw["lstm"]:
                z = torch.zeros(kw["ld"], x.size(0), kw["h"], dtype=x.dtype)
                return self.m(x, (z, z))[0]
            return self.m(x, x.new_zeros(kw["ld"], x.size(0), kw["h"]) if v == "new" else
                          torch.zeros(kw["ld"], x.size(0), kw["h"], dtype=x.dtype))[0]
        if k == "hn":
            out = self.m(x)
            hn = out[1][0] if kw["lstm"] else out[1]
            if v == "last":
                y = hn[-1]
            elif v == "cat2":
                y = torch.cat([hn[-2], hn[-1]], -1)
            else:
                y = hn.transpose(0, 1).reshape(x.size(0), -1)
            return torch.cat([out[0], y.unsqueeze(1).expand(-1, x.size(1), -1)], -1)
        if k == "shared":
            return self.m(torch.relu(self.m(x)))
        if k == "branch":
            if v == "add":
                return self.f(x) + self.g(x)
            if v == "mul":
                return self.f(x) * torch.sigmoid(self.g(x))
            if v == "max":
                return torch.maximum(self.f(x), self.g(x))
            return torch.where(self.g(x) > 0, self.f(x), 0.0)
        if k == "fanout":
            y = torch.relu(self.m(x))
            return self.f(y) + self.g(y.detach())
        if k == "glu":
            return F.glu(self.m(x), -1)
        if k == "conv_stride":
            return self.m(x.transpose(1, 2)).transpose(1, 2)
        if k == "width_read":
            return x * (x.size(-1) ** -0.5)
        # ---------------- image blocks: x (B, C, H, W) ----------------
        if k == "conv2d":
            y = self.m(x)
            if kw.get("bn"):
                y = self.bn(y)
            return act(kw["act"], y)
        if k == "bn2d":
            return self.m(x)
        if k == "gn2d":
            return self.m(x)
        if k == "ln_hw":
            return self.m(x)
        if k == "ln_c":
            return self.m(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        if k == "lin_c":  # channels-last Linear over C
            if v == "permute":
                return self.m(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            return torch.movedim(self.m(torch.movedim(x, 1, -1)), -1, 1)
        if k == "res2d":
            y = self.f2(torch.relu(self.f1(x)))
            if kw.get("proj"):
                return self.p(x) + y
            if v == "relu_":
                return (x + y).relu_()
            return x + y
        if k == "cat_ch":
            y = torch.relu(self.m(x))
            if v == "xfirst":
                return torch.cat([x, y], 1)
            return torch.cat([y, x], dim=1)
        if k == "cat_h":
            y = self.m(x)
            if v == "xy":
                return torch.cat([x, y], 2)
            return torch.cat([x, y], -1)
        if k == "chunk_h":
            a, b = x.chunk(2, 2)
            return torch.cat([b, a], 2)
        if k == "chunk_ch":
            a, b = x.chunk(2, 1)
            return torch.cat([b, a], 1) if kw["swap"] else torch.cat([a.relu(), b], 1)
        if k == "se2d":
            if v == "conv":
                s = F.adaptive_avg_pool2d(x, 1)
                s = torch.sigmoid(self.f2(torch.relu(self.f1(s))))
                return x * s
            s = torch.sigmoid(self.f2(torch.relu(self.f1(x.mean((2, 3))))))
            if v == "view":
                s = s.view(s.size(0), s.size(1), 1, 1)
            elif v == "idx":
                s = s[:, :, None, None]
            else:
                s = s.unsqueeze(-1).unsqueeze(-1)
            return x * s
        if k == "expand2d":
            m = x.mean((2, 3), keepdim=True)
            if v == "expand_as":
                return x - m.expand_as(x)
            return x * torch.sigmoid(m.expand(-1, -1, x.size(2), x.size(3)))
        if k == "flat_roundtrip":
            b, c, h, w = x.shape
            if v == "unflatten":
                return x.flatten(2).relu().unflatten(2, (h, w))
            if v == "view_read":
                return x.view(b, c, h * w).tanh().view(b, c, h, w)
            return x.reshape(b, -1, h, w)
        if k == "perm2d":
            return x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        if k == "slice_ch":
            return x[:, kw["a"]:kw["b"]]
        if k == "slice_h":
            return x[:, :, kw["a"]:kw["b"]]
        if k == "pool2d":
            if v == "max":
                return F.max_pool2d(x, 2)
            if v == "avg":
                return self.m(x)
            return F.adaptive_avg_pool2d(x, kw["h"])
        if k == "interp2d":
            if v == "nearest":
                return F.interpolate(x, scale_factor=2.0)
            if v == "bilinear":
                return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            return self.m(x)
        if k == "inplace2d":
            y = self.m(x)
            if v == "relu_":
                return y.relu_()
            if v == "hardtanh":
                return F.hardtanh(y, inplace=True)
            y.add_(1.0)
            return y
        if k == "pixel_shuffle":
            return F.pixel_shuffle(x, 2)
        # ---------------- transitions ----------------
        if k == "img2seq":
            if v == "flatten":
                return x.flatten(2).transpose(1, 2)
            if v == "mean_h":
                return x.mean(2).permute(0, 2, 1)
            if v == "view":
                return x.view(x.size(0), kw["c"], -1).transpose(1, 2)
            if v == "read_merge":   # the merged size computed from the width read off x
                b_, c_, h_, w_ = x.shape
                return x.permute(0, 3, 1, 2).reshape(b_, w_, c_ * h_)
            # (B, W, C*H): features become blocks
            return x.permute(0, 3, 1, 2).flatten(2)
        if k == "head_seq":
            if v == "mean":
                y = x.mean(1)
            elif v == "last":
                y = x[:, -1]
            elif v == "flatten":
                y = x.flatten(1)
            elif v == "amax":
                y = x.amax(1)
            elif v == "sum":
                y = torch.sum(x, dim=1)
            else:
                y = x.max(1)[0]
            return self.m(y)
        if k == "head_img":
            if v == "flatten":
                y = torch.flatten(x, 1)
            elif v == "view":
                y = x.contiguous().view(x.size(0), -1)
            elif v == "mean":
                y = x.mean((2, 3))
            else:
                y = F.adaptive_avg_pool2d(x, 1).flatten(1)
            return self.m(y)
        raise AssertionError(k)


class Net(nn.Module):
    def __init__(self, blocks, aux):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.aux = aux

    def forward(self, x):
        mid = None
        for i, b in enumerate(self.blocks):
            x = b(x)
            if i == self.aux:
                mid = x
        if mid is not None:
            return x, mid
        return x


# --------------------------------------------------------------------------------------
# generator
# --------------------------------------------------------------------------------------
SEQ_KINDS = {
    "linear": [""], "conv1d": ["transpose", "permute", "movedim"], "bn_feat": [""], "bn_time": [""],
    "ln_time": [""], "ln_feat": [""], "gn": ["per_channel", "multi"],
    "res": ["add", "radd", "sub", "torch_add", "iadd", "add_", "mul"], "res_proj": [""],
    "cat_feat": ["xfirst", "yfirst", "yxy"], "cat_time": ["xy", "yx", "x_x0"],
    "chunk_time": ["chunk", "split", "tensor_split"], "chunk_feat": ["chunk", "split"],
    "heads": ["view", "minus_one", "unflatten", "sdpa", "sdpa_causal", "einsum"],
    "se": ["unsqueeze", "none_index", "view_lit", "reshape_m1"],
    "expand": ["expand", "expand_as", "expand_lit", "broadcast_to"],
    "bparam": ["gamma", "time_bias", "buffer", "gamma_view"],
    "reshape_bt": ["reshape_m1", "reshape_lit", "flatten01"], "unflat": ["feat", "time", "group_sum"],
    "perm": ["permute", "movedim", "tb", "mT"], "unsq": ["1", "-1", "0"],
    "slice_feat": ["ellipsis", "full", "narrow"], "slice_time": ["slice", "narrow"],
    "rnn": ["batch_first", "time_first"], "rnn_h0": [""], "rnn_state": ["chain", "parallel"],
    "ew_const": ["affine", "clamp", "pow", "rsub", "div", "where", "exp"],
    "ew_bcast": ["amax_t", "sum_t", "std_t", "mean_feat"],
    "attn": ["matmul", "bmm", "sdpa", "einsum"],
    "inplace": ["relu_", "F_inplace", "mul_", "iadd", "clamp_"],
    "pool_time": ["avg", "max", "adaptive", "module"], "interp_time": ["scale", "linear", "size"],
    "width_read": [""], "stack_flat": ["feat", "time", "unbind"], "h0_zeros": ["zeros", "new"],
    "hn": ["last", "cat2", "flat"], "shared": [""], "branch": ["add", "mul", "max", "where"], "fanout": [""],
    "glu": [""], "conv_stride": [""],
}
IMG_KINDS = {
    "conv2d": ["std", "dw", "dwmult", "convT", "convT2", "dwT", "grouped"], "bn2d": [""],
    "gn2d": ["per_channel", "multi"], "ln_hw": [""], "ln_c": [""], "lin_c": ["permute", "movedim"],
    "res2d": ["add", "relu_", "proj"], "cat_ch": ["xfirst", "yfirst"], "cat_h": ["xy", "w"],
    "chunk_h": [""], "chunk_ch": [""], "se2d": ["conv", "view", "idx", "unsq"],
    "expand2d": ["expand_as", "expand"], "flat_roundtrip": ["unflatten", "view_read", "reshape_m1"],
    "perm2d": [""], "slice_ch": [""], "slice_h": [""], "pool2d": ["max", "avg", "adaptive"],
    "interp2d": ["nearest", "bilinear", "upsample"], "inplace2d": ["relu_", "hardtanh", "add_"],
    "pixel_shuffle": [""],
}


def _chain(rng, make_block, c, size, depth):
    """1–3 blocks drawn one after another by ``make_block`` (those it gives up on left
    out): (blocks, channels out, length or size out). Shared by both block makers."""
    subs = []
    for _ in range(rng.randint(1, 3)):
        r = make_block(rng, c, size, depth + 1)
        if r is None:
            continue
        sb, c, size = r
        subs.append(sb)
    return subs, c, size


def make_seq_block(rng, c, t, depth=0):
    """-> (block, c', t') or None."""
    if depth < 2 and rng.random() < 0.2:
        var = rng.choice(["add", "cat", "gate", "proj", "plain"])
        b = Blk("chain", var)
        subs, c2, t2 = _chain(rng, make_seq_block, c, t, depth)
        if not subs or t2 != t:
            return None
        b.sub = nn.ModuleList(subs)
        if var in ("add", "gate") and c2 != c:
            return None
        if var == "proj":
            b.p = nn.Linear(c2, c)
        b.kw["tags"] = [f"{sb.kind}/{sb.var}" for sb in subs]
        return b, {"add": c, "gate": c, "proj": c, "cat": c + c2, "plain": c2}[var], t
    kind = rng.choice(list(SEQ_KINDS))
    var = rng.choice(SEQ_KINDS[kind])
    W = lambda: rng.randint(2, 10)  # noqa: E731
    b = Blk(kind, var)
    if kind == "linear":
        w = W(); b.m = nn.Linear(c, w, bias=rng.random() < .7); b.kw["act"] = rng.choice(ACTS); return b, w, t
    if kind == "conv1d":
        mode = rng.choice(["std", "dw", "dwmult", "convT", "dwT", "convT2"])
        b.kw["act"] = rng.choice(ACTS); b.kw["mode"] = mode
        if mode == "std":
            w = W(); b.m = nn.Conv1d(c, w, 3, padding=1, bias=rng.random() < .7)
        elif mode == "dw":
            w = c; b.m = nn.Conv1d(c, c, 3, padding=1, groups=c)
        elif mode == "dwmult":
            w = c * 2; b.m = nn.Conv1d(c, w, 3, padding=1, groups=c)
        elif mode == "convT":
            w = W(); b.m = nn.ConvTranspose1d(c, w, 3, padding=1)
        elif mode == "convT2":
            w = W(); b.m = nn.ConvTranspose1d(c, w, 2, stride=2); t = t * 2
        else:
            w = c * rng.choice([1, 2]); b.m = nn.ConvTranspose1d(c, w, 3, padding=1, groups=c)
        if rng.random() < .4:
            b.kw["bn"] = True; b.bn = rand_bn(nn.BatchNorm1d(w))
        return b, w, t
    if kind == "bn_feat":
        b.m = rand_bn(nn.BatchNorm1d(c)); return b, c, t
    if kind == "bn_time":
        b.m = rand_bn(nn.BatchNorm1d(t)); return b, c, t
    if kind == "ln_time":
        b.m = nn.LayerNorm(t); return b, c, t
    if kind == "ln_feat":
        b.m = nn.LayerNorm(c); return b, c, t
    if kind == "gn":
        if var == "multi" and c % 2 == 0:
            b.m = nn.GroupNorm(c // 2, c)
        else:
            b.m = nn.GroupNorm(c, c)
        with torch.no_grad():
            b.m.weight.normal_(1, .3); b.m.bias.normal_(0, .3)
        return b, c, t
    if kind == "res":
        w = W(); b.f1 = nn.Linear(c, w); b.f2 = nn.Linear(w, c); return b, c, t
    if kind == "res_proj":
        w, w2 = W(), W(); b.f1 = nn.Linear(c, w); b.f2 = nn.Linear(w, w2); b.p = nn.Linear(c, w2); return b, w2, t
    if kind == "cat_feat":
        w = W(); b.m = nn.Linear(c, w); b.kw["act"] = rng.choice(ACTS)
        return b, (c + w if var != "yxy" else c + 2 * w), t
    if kind == "cat_time":
        if var != "x_x0":
            b.m = nn.Linear(c, c)
        return b, c, (t + 1 if var == "x_x0" else 2 * t)
    if kind == "chunk_time":
        if t < 2:
            return None
        b.kw["s"] = rng.randint(1, t - 1); return b, c, t
    if kind == "heads":
        heads, dh = rng.choice([2, 3]), rng.randint(1, 4)
        b.q, b.k, b.v = (nn.Linear(c, heads * dh) for _ in range(3))
        w = W(); b.o = nn.Linear(heads * dh, w)
        b.kw.update(heads=heads, dh=dh, scale=rng.choice([1.0, 0.5])); return b, w, t
    if kind == "chunk_feat":
        if c < 2 or (var == "chunk" and c % 2):
            return None
        b.kw.update(s=rng.randint(1, c - 1), c=c, swap=rng.random() < .5); return b, c, t
    if kind == "se":
        r = rng.randint(1, 6); b.f1 = nn.Linear(c, r); b.f2 = nn.Linear(r, c); b.kw["c"] = c; return b, c, t
    if kind == "expand":
        b.kw["c"] = c; return b, c, t
    if kind == "bparam":
        if var == "time_bias":
            b.tb = nn.Parameter(torch.randn(t, 1))
        elif var == "buffer":
            b.register_buffer("buf", torch.rand(c) + .5)
        else:
            b.gamma = nn.Parameter(torch.rand(c) + .5)
        return b, c, t
    if kind == "reshape_bt":
        w = W(); b.m = nn.Linear(c, w); b.kw["c"] = c; return b, w, t
    if kind == "unflat":
        g = rng.choice([d for d in (1, 2, 3) if c % d == 0]); b.kw.update(c=c, g=g)
        return b, (c // g if var == "group_sum" else c), t
    if kind == "stack_flat":
        return b, (2 * c if var == "feat" else c), (2 * t if var == "time" else t)
    if kind in ("h0_zeros", "hn"):
        cls = rng.choice([nn.GRU, nn.LSTM]); h = rng.randint(2, 8); L = rng.randint(1, 2); bi = rng.random() < .5
        b.m = cls(c, h, num_layers=L, bidirectional=bi, batch_first=True); D = 2 if bi else 1
        b.kw.update(ld=L * D, h=h, lstm=cls is nn.LSTM)
        if kind == "hn":
            if var == "cat2" and not bi:
                return None
            f = {"last": h, "cat2": 2 * h, "flat": L * D * h}[var]
            return b, h * D + f, t
        return b, h * D, t
    if kind == "shared":
        b.m = nn.Linear(c, c); return b, c, t
    if kind == "branch":
        w = W(); b.f = nn.Linear(c, w); b.g = nn.Linear(c, w); return b, w, t
    if kind == "fanout":
        w, w2 = W(), W(); b.m = nn.Linear(c, w); b.f = nn.Linear(w, w2); b.g = nn.Linear(w, w2); return b, w2, t
    if kind == "glu":
        w = W(); b.m = nn.Linear(c, 2 * w); return b, w, t
    if kind == "conv_stride":
        if t < 3:
            return None
        w = W(); b.m = nn.Conv1d(c, w, 3, stride=2); return b, w, (t - 3) // 2 + 1
    if kind in ("perm", "unsq", "ew_const", "ew_bcast", "width_read"):
        return b, c, t
    if kind == "slice_feat":
        a = rng.randint(0, c - 1); e = rng.randint(a + 1, c); st = rng.choice([1, 1, 2]) if var != "narrow" else 1
        b.kw.update(a=a, b=e, st=st); return b, len(range(a, e, st)), t
    if kind == "slice_time":
        a = rng.randint(0, t - 1); e = rng.randint(a + 1, t); st = rng.choice([1, 1, 2]) if var != "narrow" else 1
        b.kw.update(a=a, b=e, st=st); return b, c, len(range(a, e, st))
    if kind in ("rnn", "rnn_h0", "rnn_state"):
        cls = rng.choice([nn.GRU, nn.LSTM]); h = rng.randint(2, 8); L = rng.randint(1, 2); bi = rng.random() < .5
        bf = not (kind == "rnn" and var == "time_first")
        b.m = cls(c, h, num_layers=L, bidirectional=bi, batch_first=bf, bias=rng.random() < .8)
        D = 2 if bi else 1
        if kind == "rnn_h0":
            b.h0 = nn.Linear(c, L * D * h); b.kw.update(ld=L * D, h=h, lstm=cls is nn.LSTM)
        if kind == "rnn_state":
            b.m2 = cls(h * D if var == "chain" else c, h, num_layers=L, bidirectional=bi, batch_first=True)
        return b, h * D, t
    if kind == "attn":
        d = W(); b.q = nn.Linear(c, d); b.k = nn.Linear(c, d); b.v = nn.Linear(c, d); return b, d, t
    if kind == "inplace":
        w = W(); b.m = nn.Linear(c, w); return b, w, t
    if kind == "pool_time":
        if t < 2:
            return None
        if var == "adaptive":
            nt = rng.randint(1, t); b.kw["t"] = nt; return b, c, nt
        if var == "module":
            b.m = nn.MaxPool1d(2)
        return b, c, t // 2
    if kind == "interp_time":
        if var == "size":
            nt = rng.randint(1, 2 * t); b.kw["t"] = nt; return b, c, nt
        return b, c, 2 * t
    raise AssertionError(kind)


def make_img_block(rng, c, h, depth=0):
    if depth < 2 and rng.random() < 0.2:
        var = rng.choice(["add", "cat", "proj"])
        b = Blk("chain2d", var)
        subs, c2, h2 = _chain(rng, make_img_block, c, h, depth)
        if not subs or h2 != h:
            return None
        b.sub = nn.ModuleList(subs)
        if var == "add" and c2 != c:
            return None
        if var == "proj":
            b.p = nn.Conv2d(c2, c, 1)
        b.kw["tags"] = [f"{sb.kind}/{sb.var}" for sb in subs]
        return b, {"add": c, "proj": c, "cat": c + c2}[var], h
    kind = rng.choice(list(IMG_KINDS))
    var = rng.choice(IMG_KINDS[kind])
    W = lambda: rng.randint(2, 8)  # noqa: E731
    b = Blk(kind, var)
    if kind == "conv2d":
        b.kw["act"] = rng.choice(ACTS)
        if var == "std":
            w = W(); s = rng.choice([1, 1, 2]) if h >= 4 else 1
            b.m = nn.Conv2d(c, w, 3, stride=s, padding=1, bias=rng.random() < .7); h = (h - 1) // s + 1
        elif var == "dw":
            w = c; b.m = nn.Conv2d(c, c, 3, padding=1, groups=c)
        elif var == "dwmult":
            w = c * rng.choice([2, 3]); b.m = nn.Conv2d(c, w, 3, padding=1, groups=c)
        elif var == "convT":
            w = W(); b.m = nn.ConvTranspose2d(c, w, 3, padding=1)
        elif var == "convT2":
            if h > 6:
                return None
            w = W(); b.m = nn.ConvTranspose2d(c, w, 2, stride=2); h *= 2
        elif var == "dwT":
            w = c * rng.choice([1, 2]); b.m = nn.ConvTranspose2d(c, w, 3, padding=1, groups=c)
        else:
            if c % 2:
                return None
            w = 2 * W(); b.m = nn.Conv2d(c, w, 1, groups=2)
        if rng.random() < .4:
            b.kw["bn"] = True; b.bn = rand_bn(nn.BatchNorm2d(w))
        return b, w, h
    if kind == "bn2d":
        b.m = rand_bn(nn.BatchNorm2d(c)); return b, c, h
    if kind == "gn2d":
        b.m = nn.GroupNorm(c // 2, c) if (var == "multi" and c % 2 == 0) else nn.GroupNorm(c, c)
        with torch.no_grad():
            b.m.weight.normal_(1, .3); b.m.bias.normal_(0, .3)
        return b, c, h
    if kind == "ln_hw":
        b.m = nn.LayerNorm([h, h]); return b, c, h
    if kind == "ln_c":
        b.m = nn.LayerNorm(c); return b, c, h
    if kind == "lin_c":
        w = W(); b.m = nn.Linear(c, w); return b, w, h
    if kind == "res2d":
        w = W()
        b.f1 = nn.Conv2d(c, w, 3, padding=1)
        if var == "proj":
            w2 = W(); b.f2 = nn.Conv2d(w, w2, 1); b.p = nn.Conv2d(c, w2, 1); b.kw["proj"] = True; return b, w2, h
        b.f2 = nn.Conv2d(w, c, 1); return b, c, h
    if kind == "cat_ch":
        w = W(); b.m = nn.Conv2d(c, w, 3, padding=1); return b, c + w, h
    if kind == "cat_h":
        if var == "w":
            return None if True else None  # width differs from height afterwards: keep square maps
        b.m = nn.Conv2d(c, c, 1)
        return None  # non-square maps not tracked by this generator; skip
    if kind == "chunk_h":
        return (b, c, h) if h % 2 == 0 else None
    if kind == "chunk_ch":
        if c % 2:
            return None
        b.kw["swap"] = rng.random() < .5; return b, c, h
    if kind == "se2d":
        r = rng.randint(1, 4)
        if var == "conv":
            b.f1 = nn.Conv2d(c, r, 1); b.f2 = nn.Conv2d(r, c, 1)
        else:
            b.f1 = nn.Linear(c, r); b.f2 = nn.Linear(r, c)
        return b, c, h
    if kind in ("expand2d", "flat_roundtrip", "perm2d"):
        return b, c, h
    if kind == "slice_ch":
        a = rng.randint(0, c - 1); e = rng.randint(a + 1, c); b.kw.update(a=a, b=e); return b, e - a, h
    if kind == "slice_h":
        return None  # keeps maps square only when also slicing w; skip
    if kind == "pool2d":
        if h < 2:
            return None
        if var == "adaptive":
            nh = rng.randint(1, h); b.kw["h"] = nh; return b, c, nh
        if var == "avg":
            b.m = nn.AvgPool2d(2)
        return b, c, h // 2
    if kind == "interp2d":
        if h > 6:
            return None
        if var == "upsample":
            b.m = nn.Upsample(scale_factor=2, mode="nearest")
        return b, c, 2 * h
    if kind == "inplace2d":
        w = W(); b.m = nn.Conv2d(c, w, 1); return b, w, h
    if kind == "pixel_shuffle":
        return (b, c // 4, 2 * h) if c % 4 == 0 and h <= 6 else None
    raise AssertionError(kind)


DTYPE = torch.float64


def generate(seed):
    """-> model (float64), example inputs, other inputs list, list of pattern tags."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    fam = rng.choice(["seq", "seq", "img", "crnn"])
    blocks, tags = [], []
    B = rng.choice([2, 2, 3])
    if fam in ("img", "crnn"):
        c, h = rng.randint(1, 4), rng.choice([4, 6, 8])
        c0, h0 = c, h
        for _ in range(rng.randint(1, 6)):
            for _try in range(10):
                r = make_img_block(rng, c, h)
                if r is not None:
                    break
            else:
                continue
            b, c, h = r
            blocks.append(b); tags.append(f"img:{b.kind}/{b.var}")
            tags += [f"img:{t_}" for t_ in b.kw.get("tags", [])]
        if fam == "crnn":
            var = rng.choice(["flatten", "mean_h", "view", "perm_blocks", "read_merge"])
            b = Blk("img2seq", var, c=c); blocks.append(b); tags.append(f"trans:img2seq/{var}")
            if var in ("perm_blocks", "read_merge"):
                c, t = c * h, h
            elif var == "mean_h":
                t = h
            else:
                t = h * h
    if fam in ("seq", "crnn"):
        if fam == "seq":
            c, t = rng.randint(1, 6), rng.randint(3, 6)
            c0, t0 = c, t
        for _ in range(rng.randint(1, 7)):
            for _try in range(10):
                r = make_seq_block(rng, c, t)
                if r is not None:
                    break
            else:
                continue
            b, c, t = r
            blocks.append(b)
            extra = f"/{b.kw.get('mode')}" if b.kind == "conv1d" else ""
            if b.kind.startswith("rnn"):
                extra = f"/{type(b.m).__name__}{'/bi' if b.m.bidirectional else ''}{'/L2' if b.m.num_layers > 1 else ''}"
            tags.append(f"seq:{b.kind}/{b.var}{extra}")
            tags += [f"seq:{t_}" for t_ in b.kw.get("tags", [])]
        head = rng.choice(["mean", "last", "flatten", "amax", "sum", "maxv", "none"])
        if head != "none":
            b = Blk("head_seq", head)
            b.m = nn.Linear(c * t if head == "flatten" else c, rng.randint(1, 4)); blocks.append(b)
        tags.append(f"head:seq/{head}")
    else:
        head = rng.choice(["flatten", "view", "mean", "gap", "none"])
        if head != "none":
            b = Blk("head_img", head)
            b.m = nn.Linear(c * h * h if head in ("flatten", "view") else c, rng.randint(1, 4)); blocks.append(b)
        tags.append(f"head:img/{head}")
    aux = rng.choice([None, None, None, rng.randrange(len(blocks))]) if blocks else None
    if aux is not None and aux == len(blocks) - 1:
        aux = None
    if aux is not None:
        tags.append("aux_output")
    model = Net(blocks, aux).to(DTYPE)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            rand_bn(m)
    if fam == "seq":
        ex = (torch.randn(B, t0, c0, dtype=DTYPE),)
        others = [(torch.randn(B + 1, t0, c0, dtype=DTYPE),),
                  (torch.randn(B, t0 + 2, c0, dtype=DTYPE),),
                  (torch.randn(1, t0 + 1, c0, dtype=DTYPE),)]
    else:
        ex = (torch.randn(B, c0, h0, h0, dtype=DTYPE),)
        others = [(torch.randn(B + 1, c0, h0, h0, dtype=DTYPE),),
                  (torch.randn(B, c0, h0 + 2, h0 + 2, dtype=DTYPE),),
                  (torch.randn(1, c0, h0 * 2, h0 * 2, dtype=DTYPE),)]
    return model, ex, others, tags, fam


# --------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------
def snapshot(m):
    return ({k: v.detach().clone() for k, v in m.state_dict().items()},
            [x.training for x in m.modules()], repr(m))


def same(a, b):
    if a[0].keys() != b[0].keys():
        return "state keys differ"
    for k in a[0]:
        if a[0][k].shape != b[0][k].shape or not torch.equal(a[0][k], b[0][k]):
            return f"state {k} differs"
    if a[1] != b[1]:
        return "training flags"
    if a[2] != b[2]:
        return "module tree"
    return None


def call(m, xs):
    try:
        with torch.no_grad():
            return m(*[x.clone() for x in xs])
    except Exception as e:  # noqa: BLE001
        return e


def err(a, b):
    if isinstance(a, tuple):
        if not isinstance(b, tuple) or len(a) != len(b):
            return float("inf")
        return max(err(x, y) for x, y in zip(a, b))
    if not torch.is_tensor(b) or a.shape != b.shape:
        return float("inf")
    return float(max_relative_error(a, b))


TOL = 1e-6  # float64 models


def bad(m1, m2, xs, a, b):
    """error if m1(xs)=a and m2(xs)=b disagree beyond TOL, with a float64 second opinion for f32."""
    e = err(a, b)
    if e <= TOL:
        return None
    if DTYPE is torch.float32 and e != float("inf"):
        try:
            d1, d2 = copy.deepcopy(m1).double().eval(), copy.deepcopy(m2).double().eval()
            x64 = tuple(x.double() for x in xs)
            e64 = err(call(d1, x64), call(d2, x64))
            if e64 <= 1e-9 or e64 * 1e4 <= e:
                return None
            return f"{e} (float64 recheck {e64})"
        except Exception as ex_:  # noqa: BLE001
            return f"{e} (float64 recheck failed {ex_})"
    return e


def check_case(seed, kmin=None, do_reorder=True):
    """-> (status, tags, problems list)."""
    model, ex, others, tags, fam = generate(seed)
    problems = []
    ref_model = copy.deepcopy(model).eval()
    ref = call(ref_model, ex)
    if isinstance(ref, Exception):
        return "genbug", tags, [f"original fails: {type(ref).__name__}: {ref}"]
    refs_other = [call(ref_model, o) for o in others]
    snap = snapshot(model)
    opts = {} if kmin is None else {"kappa_min": kmin}
    try:
        dm = dcopt.convert(model, ex, **opts)
    except dcopt.DcoptError as e:
        if (s := same(snap, snapshot(model))):
            problems.append(f"MUTATED after convert error: {s}")
        return f"convert_rejected:{type(e).__name__}", tags, problems + [f"info: {str(e)[:200]}"]
    except Exception as e:  # noqa: BLE001
        return "CRASH_convert", tags, [f"CRASH convert {type(e).__name__}: {e}", traceback.format_exc()[-1500:]]
    if (s := same(snap, snapshot(model))):
        problems.append(f"MUTATED by convert: {s}")
    groups = list(dm.plan.groups)
    dm.eval()
    full = call(dm, ex)
    e = bad(ref_model, dm, ex, ref, full) if not isinstance(full, Exception) else float("inf")
    if e is not None:
        problems.append(f"FULLWIDTH gated != user on ex: {e} {full if isinstance(full, Exception) else ''}")
    for i, (o, r) in enumerate(zip(others, refs_other)):
        g = call(dm, o)
        if isinstance(r, Exception):
            continue
        if isinstance(g, Exception):
            problems.append(f"FULLWIDTH gated fails on other#{i} where user works: {type(g).__name__}: {g}")
        elif (e := bad(ref_model, dm, o, r, g)) is not None:
            problems.append(f"FULLWIDTH gated != user on other#{i}: {e}")
    # fixed phase, train mode: identical to the user's model in train mode
    try:
        dmt = copy.deepcopy(dm); dmt.fix_sizes(); dmt.train()
        ut = copy.deepcopy(model).train()
        torch.manual_seed(5); a = call(ut, ex)
        torch.manual_seed(5); b = call(dmt, ex)
        if not isinstance(a, Exception):
            if isinstance(b, Exception) or (e := bad(ut, dmt, ex, a, b)) is not None:
                problems.append(f"TRAINMODE fixed-phase gated != user: {b if isinstance(b, Exception) else e}")
    except Exception as ex_:  # noqa: BLE001
        problems.append(f"CRASH trainmode {type(ex_).__name__}: {ex_}")
    rng = random.Random(seed * 7 + 1)
    size_sets = []
    if groups:
        size_sets.append({g.name: dm.size_floor(g.name) for g in groups})
        size_sets.append({g.name: max(dm.size_floor(g.name), g.width // 2) for g in groups})
        size_sets.append({g.name: rng.randint(dm.size_floor(g.name), g.width) for g in groups})
    else:
        size_sets.append(None)
    for sizes in size_sets:
        try:
            if sizes:
                dm.set_sizes(sizes)
            small = dcopt.export(dm)
        except dcopt.ExportError as ex_:
            problems.append(f"EXPORTERROR sizes={sizes}: {str(ex_)[:400]}")
            continue
        except dcopt.DcoptError as ex_:
            problems.append(f"export DcoptError {type(ex_).__name__} sizes={sizes}: {str(ex_)[:300]}")
            continue
        except Exception as ex_:  # noqa: BLE001
            problems.append(f"CRASH export {type(ex_).__name__}: {ex_} sizes={sizes}\n{traceback.format_exc()[-1500:]}")
            continue
        if any(type(m).__module__.startswith("dcopt") for m in small.modules()):
            problems.append("dcopt module in export")
        dm.eval(); small.eval()
        for i, xs in enumerate([ex] + others):
            a, b = call(dm, xs), call(small, xs)
            if isinstance(a, Exception) or isinstance(b, Exception):
                if isinstance(a, Exception) != isinstance(b, Exception):
                    r = ref if i == 0 else refs_other[i - 1]
                    problems.append(f"ONLYONE input#{i} sizes={sizes}: dm={'ERR ' + str(a)[:150] if isinstance(a, Exception) else 'ok'}"
                                    f" small={'ERR ' + str(b)[:150] if isinstance(b, Exception) else 'ok'} user={'ERR' if isinstance(r, Exception) else 'ok'}")
                continue
            e = bad(dm, small, xs, a, b)
            if e is not None:
                problems.append(f"MISMATCH input#{i} sizes={sizes}: rel err {e}")
        try:
            kept = dm.complexity("kept")
            pm, cm = round(kept.macs.item()), dcopt.count_macs(small, ex)
            if pm != cm:
                problems.append(f"MACS pred {pm} counted {cm} sizes={sizes}")
            pp, cp = round(kept.params.item()), sum(p.numel() for p in small.parameters())
            if pp != cp:
                problems.append(f"PARAMS pred {pp} counted {cp} sizes={sizes}")
        except Exception as ex_:  # noqa: BLE001
            problems.append(f"CRASH complexity {type(ex_).__name__}: {ex_}")
    if (s := same(snap, snapshot(model))):
        problems.append(f"MUTATED by export: {s}")
    # reorder on a fresh conversion
    if do_reorder and groups:
        try:
            dm2 = dcopt.convert(model, ex, **opts)
            rep = dcopt.reorder_by_importance(dm2)
            dm2.eval()
            for i, xs in enumerate([ex] + others):
                r = ref if i == 0 else refs_other[i - 1]
                if isinstance(r, Exception):
                    continue
                g = call(dm2, xs)
                if isinstance(g, Exception) or (e := bad(ref_model, dm2, xs, r, g)) is not None:
                    problems.append(f"REORDER changed function on input#{i}: {g if isinstance(g, Exception) else e}"
                                    f" perms={ {k: v for k, v in rep.perms.items()} }")
            sizes = size_sets[-1]
            dm2.set_sizes(sizes)
            sm2 = dcopt.export(dm2)
            dm2.eval(); sm2.eval()
            for i, xs in enumerate([ex] + others):
                a, b = call(dm2, xs), call(sm2, xs)
                if isinstance(a, Exception) or isinstance(b, Exception):
                    continue
                if (e := bad(dm2, sm2, xs, a, b)) is not None:
                    problems.append(f"REORDER+EXPORT mismatch input#{i}: {e}")
        except dcopt.ReorderError as e:
            problems.append(f"REORDERERROR: {str(e)[:300]}")
        except dcopt.ExportError as e:
            problems.append(f"REORDER then EXPORTERROR: {str(e)[:300]}")
        except dcopt.DcoptError as e:
            problems.append(f"reorder DcoptError {type(e).__name__}: {str(e)[:200]}")
        except Exception as e:  # noqa: BLE001
            problems.append(f"CRASH reorder {type(e).__name__}: {e}\n{traceback.format_exc()[-1200:]}")
        if (s := same(snap, snapshot(model))):
            problems.append(f"MUTATED by reorder: {s}")
    status = "ok" if not problems else "FAIL"
    if status == "ok":
        status = f"ok:{len(groups)}groups"
    return status, tags, problems


