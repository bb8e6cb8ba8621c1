"""The noise gate and the RNN unit mask: the leaf modules that make widths learnable.

They are leaves on purpose (DESIGN invariant 6): fx would bake ``torch.randn`` and
``self.training`` into a traced graph as constants.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .errors import TraceError
from .rnn_noise import SigmaCache, step_noise_forward

__all__ = ["FeatureGate", "GatedRNN", "MaskedNorm", "FunctionalNorm", "masked_norm", "consolidated", "kept_size", "round_size", "kappa_for", "floor_size",
           "LAMBDA_EPS", "INT_TOL"]

#: λ is mapped affinely into [ε, 1-ε]: sqrt(λ) and sqrt(1-λ) keep finite derivatives.
LAMBDA_EPS = 1e-3
#: a size within this distance above an integer counts as that integer (κ is float32). An
#: absolute tolerance: float32 κ = n/N can miss n by up to N·2⁻²⁵ features, more than this
#: on groups wider than ~33.5k, so sizes are *set* through :func:`kappa_for` instead.
INT_TOL = 1e-3


def consolidated(kappa: torch.Tensor, width: int, round_to: int = 1) -> int:
    """The integer size a group keeps: ⌈s⌉ with s = κ·N, at least 1, rounded up to a
    multiple of ``round_to``, at most N."""
    return kept_size(float(kappa.detach().double()) * width, width, round_to)


def kept_size(s: float, width: int, round_to: int = 1) -> int:
    """:func:`consolidated` for a size s itself (the landing in dcopt/budget.py searches
    over scaled sizes with the same rule eval and export keep)."""
    return round_size(int(max(1, math.ceil(s - INT_TOL))), width, round_to)


def kappa_for(n: int, width: int, dtype: torch.dtype = torch.float32, kappa_min: float = 0.0) -> torch.Tensor:
    """The κ (a scalar of ``dtype``, at least ``kappa_min`` as ``clamp`` rounds it) at which
    :func:`consolidated` keeps exactly ``n`` of ``width`` features (before ``round_to``).

    Not simply ``n / width``: rounded to float32 that is off by up to width·2⁻²⁵ features,
    more than :data:`INT_TOL` once width > ~33.5k, and ⌈s⌉ then kept n+1 while export
    sliced to n. The neighbouring float32 values are width·2⁻²⁴ features apart at most
    (< 1 for width ≤ 2²⁴), so stepping by one ulp towards ``n`` lands in (n−1+tol, n+tol]
    within a step or two. Raises ``ValueError`` where no value of ``dtype`` keeps ``n``
    (a half-precision κ on a wide group)."""
    lo = float(kappa_min)
    k = torch.tensor(n / width, dtype=torch.float64).to(dtype).clamp(lo, 1.0)
    have = consolidated(k, width)
    for _ in range(64):
        if have == n:
            return k
        nxt = torch.nextafter(k, k.new_tensor(0.0 if have > n else 2.0)).clamp(lo, 1.0)
        got = consolidated(nxt, width)
        if nxt == k or (got - n) * (have - n) < 0:   # stuck at a bound, or stepped over n
            break
        k, have = nxt, got
    raise ValueError(f"no {dtype} κ keeps exactly {n} of {width} features (κ_min = {kappa_min:g}); "
                     "keep the sizes in float32 or float64")


def floor_size(kappa_min: float, width: int, dtype: torch.dtype = torch.float32) -> int:
    """The smallest size a group of ``width`` can keep: ⌈κ_min·N⌉, or one more where κ_min
    rounded to ``dtype`` (the value κ is clamped to) keeps one more (κ_min = 0.1 in float32
    is 0.1 + 1.5e-9: above ~670k features that is more than :data:`INT_TOL`). The larger
    of the two, so a size the float32 model accepts its float64 copy (export's second
    opinion) accepts too."""
    at_min = torch.tensor(kappa_min, dtype=dtype).clamp(kappa_min, 1.0)
    return max(kept_size(kappa_min * width, width), consolidated(at_min, width))


def round_size(n: int, width: int, round_to: int = 1) -> int:
    """``n`` rounded up to a multiple of ``round_to``, at most ``width``."""
    if round_to > 1:
        n = -(-n // round_to) * round_to
    return int(min(width, n))


def _boundary(s: torch.Tensor, widths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The noisy boundary of sizes ``s`` (per group, or one): index m = min(⌊s⌋, N−1) of
    the boundary feature and its share λ = s − m, mapped into [ε, 1−ε]. The clamp is
    straight-through, so at κ = 1 (λ = 1) the gradient still reaches s. One rule for the
    output gate and the RNN's recurrence, so both put the noise on the same unit."""
    m = torch.minimum(torch.floor(s.detach()), widths - 1)
    frac = s - m
    frac = frac + (frac.detach().clamp(0.0, 1.0) - frac.detach())
    return m, LAMBDA_EPS + (1 - 2 * LAMBDA_EPS) * frac


class FeatureGate(nn.Module):
    """Feature-noise gate on one tensor, right before the layers that mix its features.

    Along ``dim`` each position holds channel ``ch`` of local group ``group`` (or -1: a
    fixed position, always passed). With ``s = κ·N``, ``m = min(⌊s⌋, N-1)`` and
    ``λ = s - m``, in training with noise on:

        x̃ = x (ch < m),  √λ·x + √(1-λ)·σ·ν (ch == m),  0 (ch > m)

    with σ the detached std of that position over every other dim. Otherwise it keeps
    the first ⌈s⌉ channels exactly and zeroes the rest (``torch.where``, so an inf or NaN
    in a removed feature cannot leak through ``0·x``).
    """

    def __init__(self, dim: int, group: torch.Tensor, ch: torch.Tensor, widths: Sequence[int],
                 rank: int | None = None, where: str | None = None):
        super().__init__()
        self.dim = dim
        # the rank of the gated tensor on the example inputs, and the user's line that made
        # it: a model whose ranks depend on its input's shape (``h.squeeze()`` on a batch of
        # 1) would otherwise gate another dim of the same length without a word
        self.rank = rank
        self.where = where
        self.widths = list(widths)
        self.noise = False
        self.round_to = 1   # kept sizes are multiples of this (set by DynamicModel from its Config)
        self.register_buffer("group", group.clone(), persistent=False)
        self.register_buffer("ch", ch.clone(), persistent=False)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, positions={self.group.numel()}, widths={self.widths}"

    def _view(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[self.dim] = v.numel()
        return v.view(shape)

    def _per_position(self, values: torch.Tensor, fill) -> torch.Tensor:
        """values[g] for each position's group; ``fill`` at fixed positions."""
        padded = torch.cat([values, values.new_full((1,), fill)])
        idx = torch.where(self.group >= 0, self.group, torch.full_like(self.group, len(self.widths)))
        return padded[idx]

    def _check_shape(self, x: torch.Tensor) -> None:
        rank = getattr(self, "rank", None)
        if rank is None or (x.dim() == rank and x.shape[self.dim] == self.ch.numel()):
            return
        raise TraceError(
            f"a gated tensor of shape {tuple(x.shape)} where the example inputs gave rank {rank} with "
            f"{self.ch.numel()} features on dim {self.dim}: the model's ranks or feature layout depend on its "
            "input's shape (a squeeze() or flatten over a size-1 dim of the example, such as a batch of 1?)",
            location=getattr(self, "where", None),
            suggestion="Convert with example inputs shaped like your data (a batch of at least 2), "
                       "or give squeeze() its dim")

    def _eval_limit(self, kappas, device) -> torch.Tensor | None:
        """Per position, the size its group keeps (the first ⌈s⌉ channels); None: all."""
        keep = [consolidated(k, n, self.round_to) for k, n in zip(kappas, self.widths)]
        if keep == self.widths:
            return None
        return self._per_position(torch.tensor(keep, device=device), 1 << 62)

    def _boundary_at(self, kappas, x_dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per position, its group's boundary channel m; and λ per group. In at least
        float32, whatever the activations' dtype: in bfloat16 (autocast) s = κ·N rounds to
        the nearest few features, so the train-mode model would use features eval and
        export drop (and at κ = 1 a width bfloat16 cannot hold put the boundary past the
        last feature: no gradient reached κ)."""
        dt = torch.promote_types(x_dtype, torch.float32)
        widths = torch.tensor(self.widths, device=device, dtype=dt)
        s = torch.stack([k.to(dt).reshape(()) for k in kappas]) * widths
        m, lam = _boundary(s, widths)
        return self._per_position(m.long(), 1 << 62), lam

    def kept(self, kappas: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor | None:
        """Per position, whether it carries a feature of ``x`` now, as :meth:`forward` would
        gate ``x`` (None: all of them): in eval the first ⌈s⌉ channels of each group, with
        the noise on in training those up to the boundary channel m, which is noisy."""
        if self.training and self.noise:
            m_pos, _ = self._boundary_at(kappas, x.dtype, x.device)
            return (self.group < 0) | (self.ch <= m_pos)
        limit = self._eval_limit(kappas, x.device)
        return None if limit is None else self.ch < limit

    def forward(self, x: torch.Tensor, *kappas: torch.Tensor) -> torch.Tensor:
        self._check_shape(x)
        if self.training and self.noise:
            return self._noisy(x, kappas)
        limit = self._eval_limit(kappas, x.device)
        if limit is None:
            return x
        return torch.where(self._view(self.ch < limit, x), x, x.new_zeros(()))

    def _noisy(self, x: torch.Tensor, kappas) -> torch.Tensor:
        m_pos, lam = self._boundary_at(kappas, x.dtype, x.device)
        fixed = self.group < 0
        clean = fixed | (self.ch < m_pos)
        boundary = ~fixed & (self.ch == m_pos)
        b_idx = torch.nonzero(boundary, as_tuple=False).flatten()
        if b_idx.numel() == 0:
            return torch.where(self._view(clean, x), x, x.new_zeros(()))
        xb = x.detach().index_select(self.dim, b_idx)
        reduce_dims = [d for d in range(x.dim()) if d != self.dim]
        sigma = xb.std(dim=reduce_dims, keepdim=True, unbiased=False) if reduce_dims else xb.abs()
        nu = sigma * torch.randn_like(xb)
        lam_b = self._per_position(lam, 1.0)[b_idx]   # kept in float32 at least: 1 − ε is 1 in bfloat16
        return _NoisyGate.apply(x, lam_b, self._view(clean, x), b_idx, self.dim, nu)


class _NoisyGate(torch.autograd.Function):
    """The noisy gate as one op: ``x`` where ``clean``, 0 elsewhere, and at the boundary
    positions ``b_idx`` (along ``dim``) √λ·x + √(1-λ)·ν with ν = σ·N(0,1) given.

    Written out (instead of ``where(mask, x·scale, 0)`` plus an ``index_add`` of the noise)
    because each of those passes over the whole gated tensor in the forward *and* the
    backward — seven full passes per gate and step, a measurable share of a training
    step (benchmarks/speed.py). Here: one ``where`` forward, one backward; everything
    else touches only the boundary channels. The gradients are the same: ∂/∂x is 1 on
    clean positions, √λ on the boundary, 0 elsewhere; ∂/∂λ = Σ g·x/(2√λ) − Σ g·ν/(2√(1−λ))
    over the boundary channel."""

    @staticmethod
    def forward(ctx, x, lam_b, clean, b_idx, dim, nu):
        out = torch.where(clean, x, x.new_zeros(()))
        xb = x.index_select(dim, b_idx)
        shape = [1] * x.dim()
        shape[dim] = -1
        root_l = lam_b.sqrt().view(shape)
        root_1l = (1 - lam_b).sqrt().view(shape)
        out.index_copy_(dim, b_idx, (root_l * xb + root_1l * nu).to(out.dtype))
        ctx.save_for_backward(clean, b_idx, xb, nu, lam_b)
        ctx.dim = dim
        return out

    @staticmethod
    def backward(ctx, g):
        clean, b_idx, xb, nu, lam_b = ctx.saved_tensors
        dim = ctx.dim
        shape = [1] * g.dim()
        shape[dim] = -1
        gb = g.index_select(dim, b_idx)
        grad_x = grad_lam = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.where(clean, g, g.new_zeros(()))
            grad_x.index_copy_(dim, b_idx, (gb * lam_b.sqrt().view(shape)).to(grad_x.dtype))
        if ctx.needs_input_grad[1]:
            reduce = [d for d in range(g.dim()) if d != dim]
            gb, xb, nu = gb.to(lam_b.dtype), xb.to(lam_b.dtype), nu.to(lam_b.dtype)   # no-ops but in bf16
            gx, gn = gb * xb, gb * nu
            if reduce:
                gx, gn = gx.sum(reduce), gn.sum(reduce)
            grad_lam = gx / (2 * lam_b.sqrt()) - gn / (2 * (1 - lam_b).sqrt())
        return grad_x, grad_lam, None, None, None, None


class MaskedNorm(nn.Module):
    """A ``LayerNorm`` or ``RMSNorm`` over features whose width is being learned, with its
    statistics taken over the kept features only.

    A plain norm would average over the removed features' zeros too (DESIGN, "traps"),
    so the smaller model — a norm over the kept features — would compute other numbers.
    Masked, the gated model at any size computes what the exported ``LayerNorm(n)`` does:
    mean and variance (or mean square) over the kept positions, the removed ones 0. Its
    input has a :class:`FeatureGate` in front (the size noise on the boundary feature,
    which the statistics then include); ``self.gate`` here is only its positions and
    sizes, for the mask. The norm's own ``weight``/``bias`` stay on ``self.norm`` (export
    puts that module back, sliced)."""

    def __init__(self, norm: nn.Module, gate: FeatureGate):
        super().__init__()
        self.norm = norm
        self.gate = gate

    @property
    def inner(self) -> nn.Module:
        """The user's module this wraps (export puts it back)."""
        return self.norm

    def forward(self, x: torch.Tensor, *kappas: torch.Tensor) -> torch.Tensor:
        kept = self.gate.kept(kappas, x)
        if kept is None:
            return self.norm(x)
        norm = self.norm
        return masked_norm(x, kept, norm.weight, getattr(norm, "bias", None), norm.eps,
                           rms=not isinstance(norm, nn.LayerNorm), native=norm)


def masked_norm(x: torch.Tensor, kept: torch.Tensor, weight, bias, eps, *, rms: bool, native) -> torch.Tensor:
    """LayerNorm (or RMSNorm, ``rms``) of ``x`` over its last dim, the statistics over the
    positions ``kept`` only, the others 0. In float32 at least, as torch's norm kernels
    take them (in float16 a sum of squares overflows; a count of 512 is not even a
    bfloat16 number); the result in the dtype ``native`` (the norm itself) returns here,
    asked of it on one row: under autocast that is the input's on CPU, float32 on CUDA."""
    out_dtype = native(x.reshape(-1, x.shape[-1])[:1]).dtype
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    if eps is None:   # RMSNorm's default: that of the dtype it computes in (float32 for half inputs)
        eps = torch.finfo(x.dtype).eps
    zero = x.new_zeros(())
    x = torch.where(kept, x, zero)   # already 0 there (gated); never 0·inf
    count = kept.sum().to(x.dtype)
    if rms:
        y = x * torch.rsqrt((x * x).sum(-1, keepdim=True) / count + eps)
    else:
        centred = torch.where(kept, x - x.sum(-1, keepdim=True) / count, zero)
        y = centred * torch.rsqrt((centred * centred).sum(-1, keepdim=True) / count + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return torch.where(kept, y, y.new_zeros(())).to(out_dtype)


class FunctionalNorm(nn.Module):
    """``F.layer_norm`` / ``F.rms_norm`` over learned features (what a LayerNorm subclass
    with its own forward calls) in the gated graph: the call's node becomes a call of
    this module with ``(x, weight, bias, *kappas)``, which takes the statistics over the
    kept features (:func:`masked_norm`); export turns the node back into torch's call.
    A module, not a function the graph calls: a pickled GraphModule is traced again from
    its code, which would inline a function (and its ``kept`` argument with it)."""

    def __init__(self, fn, gate: FeatureGate, groups: Sequence[int], normalized_shape, eps):
        super().__init__()
        self.fn, self.gate, self.groups = fn, gate, list(groups)   # groups: the gate's local → the plan's
        self.normalized_shape, self.eps = tuple(normalized_shape), eps

    def kept_count(self, sizes: Sequence[int]) -> int:
        """How many of its features the plan's group ``sizes`` keep."""
        limit = torch.tensor([int(sizes[g]) for g in self.groups] + [1 << 62])
        group = torch.where(self.gate.group >= 0, self.gate.group, torch.full_like(self.gate.group, len(self.groups)))
        return int((self.gate.ch < limit[group]).sum())

    def call_args(self, x, weight, bias, normalized_shape=None) -> tuple[tuple, dict]:
        """torch's call, as the graph held it before (and export writes it again, with the
        kept count as ``normalized_shape``)."""
        kwargs = {"weight": weight, "eps": self.eps}
        if self.fn is F.layer_norm:
            kwargs["bias"] = bias
        return (x, tuple(normalized_shape or self.normalized_shape)), kwargs

    def forward(self, x, weight, bias, *kappas):
        kept = self.gate.kept(kappas, x)
        args, kwargs = self.call_args(x, weight, bias)
        if kept is None:
            return self.fn(*args, **kwargs)
        return masked_norm(x, kept, weight, bias if self.fn is F.layer_norm else None, self.eps,
                           rms=self.fn is F.rms_norm, native=lambda r: self.fn(r, *args[1:], **kwargs))


#: the functional norms dcopt masks: their arguments after ``input``, with defaults
NORM_FUNCTIONS = {F.layer_norm: (("normalized_shape", None), ("weight", None), ("bias", None), ("eps", 1e-5)),
                  F.rms_norm: (("normalized_shape", None), ("weight", None), ("eps", None))}


_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


class GatedRNN(nn.Module):
    """Removes hidden units of a GRU/LSTM/RNN *inside* the recurrence.

    Masking the output would not remove a unit: it would still feed the other units
    through ``weight_hh``. Here the pruned units' rows (every gate block, input and
    hidden weights, both biases), their hidden columns and the next layer's input
    columns are multiplied by zero, so the pruned units stay exactly 0 (σ(0)·0 = 0),
    the fused kernel still runs, and the kept weights still get gradients.

    In the optimize phase (``Config.rnn_noise``, on by default) the boundary unit's
    recurrent influence also gets the feature noise, per step (dcopt/rnn_noise.py): without
    it the pull on κ sees only what the next layer reads, about half of the unit's value.
    """

    def __init__(self, rnn: nn.RNNBase):
        super().__init__()
        self.rnn = rnn
        self.round_to = 1   # kept sizes are multiples of this (set by DynamicModel from its Config)
        self.noise = False  # the optimize phase's per-step recurrent noise (DynamicModel sets it when Config.rnn_noise)
        self._sigmas = SigmaCache()  # the recurrent noise's per-unit σ, kept between forwards

    @property
    def inner(self) -> nn.Module:
        """The user's module this wraps (export puts it back)."""
        return self.rnn

    def noise_state(self) -> dict:
        """The recurrent noise's cached σ (not in the state dict: a loaded model measures it
        afresh on its first noisy forward); ``fit``'s checkpoint keeps it so a resumed run
        draws exactly the noise the uninterrupted one would."""
        return self._sigmas.state()

    def load_noise_state(self, state: dict) -> None:
        self._sigmas.load(state)

    def _apply(self, fn, recurse=True):
        """``.to(dtype)`` / ``.to(device)`` reach the cached σ too (plain attributes, which
        ``nn.Module._apply`` does not see): the next noisy forward writes into them."""
        out = super()._apply(fn, recurse)
        self._sigmas.std = {k: fn(v) for k, v in self._sigmas.std.items()}
        return out

    def forward(self, kappa: torch.Tensor, *args, **kwargs):
        rnn = self.rnn
        H = rnn.hidden_size
        noisy = self.training and self.noise and kappa.requires_grad
        # noisy: the units beyond the boundary are cut, as the output's FeatureGate cuts
        # them (round_to applies to the kept sizes of eval and export, not to the noise)
        k = consolidated(kappa, H, 1 if noisy else self.round_to)
        if k >= H and not noisy:
            return rnn(*args, **kwargs)
        ref = rnn.weight_hh_l0
        unit = (torch.arange(H, device=ref.device) < k).to(ref.dtype)
        rows = unit.repeat(_GATES[rnn.mode])
        cols = unit.repeat(2 if rnn.bidirectional else 1)
        params = {}
        for name, p in rnn.named_parameters():
            if name.startswith("weight_ih"):
                first = int(name.split("_l")[1].split("_")[0]) == 0
                p = p * rows[:, None] if first else p * rows[:, None] * cols[None, :]
            elif name.startswith("weight_hh"):
                p = p * rows[:, None] * unit[None, :]
            else:
                p = p * rows
            params[name] = p
        boundary = self._boundary(kappa, H, k, ref) if noisy else None
        if boundary is not None:
            return step_noise_forward(rnn, params, *boundary, self._sigmas, *args, **kwargs)
        return functional_call(rnn, params, args, kwargs)

    @staticmethod
    def _boundary(kappa: torch.Tensor, H: int, k: int, ref: torch.Tensor):
        """(m, λ) of the boundary unit, as the output's FeatureGate computes them; None when
        that unit is already cut from the recurrence (s at an integer: λ ≈ 0)."""
        m, lam = _boundary(kappa.to(ref.dtype).reshape(()) * H, torch.tensor(H, dtype=ref.dtype))
        return (int(m), lam) if int(m) < k else None
