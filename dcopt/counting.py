"""One FLOP counter for everything dcopt counts: torch's ``FlopCounterMode`` plus the
formulas it lacks on CPU.

Why: "predicted MACs == counted MACs" is only worth something if the counter sees every
matmul. ``torch.utils.flop_counter`` (torch 2.14) has no formula for two fused CPU
kernels, so it silently counts 0 for them:

* ``aten._scaled_dot_product_flash_attention_for_cpu`` -- what
  ``F.scaled_dot_product_attention`` runs on CPU (its CUDA siblings are registered);
* ``aten._native_multi_head_attention`` -- the fused fast path ``nn.MultiheadAttention``
  takes in eval mode without grad (ViT's encoder blocks, for one): in-projection,
  attention and out-projection all disappear from the count.

Both are added here through ``FlopCounterMode(custom_mapping=...)`` (the library's own
extension point), with the same conventions as torch's formulas (2 FLOPs per MAC, bias
additions not counted), so the fast path counts exactly what the slow path does. The
fused float32 LSTM kernel is handled separately, per module, in
:func:`dcopt.report.count_macs` and the analysis (it is one op per whole sequence).
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

__all__ = ["flop_counter", "EXTRA_FLOP_FORMULAS"]

aten = torch.ops.aten


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """``(B, H, L, E) x (B, H, S, E) x (B, H, S, Ev)``: QKᵀ and attention·V."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _native_mha_flop(query_shape, key_shape, value_shape, embed_dim, num_head, qkv_weight_shape, *args,
                     out_shape=None, **kwargs) -> int:
    """Fused MHA on ``(B, L, E)`` (or unbatched ``(L, E)``) query and ``(B, S, E)`` key/value:
    the q, k and v in-projections, QKᵀ and attention·V over all heads, the out-projection."""
    def rows(shape):
        return (1, shape[0]) if len(shape) == 2 else (shape[0], shape[1])

    b, lq = rows(query_shape)
    _, s = rows(key_shape)
    e = int(embed_dim)
    in_proj = b * (lq + 2 * s) * e * e
    attention = 2 * b * lq * s * e          # QKᵀ (E split over heads) and attention·V
    out_proj = b * lq * e * e
    return 2 * (in_proj + attention + out_proj)


#: op → FLOP formula (shapes in, like torch's registry) for the kernels torch does not count.
EXTRA_FLOP_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flop,
    aten._native_multi_head_attention: _native_mha_flop,
}


def flop_counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` that also counts the kernels in :data:`EXTRA_FLOP_FORMULAS`.
    A formula torch itself gains later takes precedence over ours."""
    from torch.utils.flop_counter import flop_registry

    missing = {op: f for op, f in EXTRA_FLOP_FORMULAS.items() if op not in flop_registry}
    return FlopCounterMode(display=False, custom_mapping=missing)
