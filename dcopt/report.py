"""Readable reports (rich): what the analysis found, and what export changed."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.nn.utils.rnn import PackedSequence
from rich.console import Group as RichGroup
from rich.table import Table
from rich.text import Text

from .counting import flop_counter, parameters_without_grad
from .modes import eval_mode

if TYPE_CHECKING:  # pragma: no cover
    from .analysis import Analysis

__all__ = ["render_analysis", "export_report", "render_export_report", "count_macs"]

_ROLE_STYLE = {"DCL": "bold green", "ACL": "cyan", "FCL": "dim"}
_STATUS_STYLE = {"dynamic": "bold green", "fixed": "dim", "rejected": "bold red"}


def _rel(location):
    """``file:line`` relative to the working directory when the file is below it."""
    import os

    if not location:
        return ""
    path, _, line = location.rpartition(":")
    rel = os.path.relpath(path)
    return f"{rel if not rel.startswith('..') else path}:{line}"


def _human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def render_analysis(a: "Analysis", *, show_layers: bool = True):
    """Layers with roles, groups with widths and MACs share, rejections with file:line, totals."""
    parts = []
    if show_layers:
        layers = Table(title="Layers", show_lines=False)
        layers.add_column("layer")
        layers.add_column("op")
        layers.add_column("role")
        for node, data in a.graph.nodes(data=True):
            if data["op"] not in ("call_module", "get_attr") and a.roles.get(node) != "DCL":
                continue
            role = a.roles.get(node, "FCL")
            op = data["target"] if data["op"] != "call_module" else data.get("module_type", data["target"])
            layers.add_row(node, str(op), Text(role, style=_ROLE_STYLE.get(role, "")))
        parts.append(layers)
    groups = Table(title="Groups")
    for col in ("group", "width N", "status", "MACs share", "producers", "why fixed"):
        groups.add_column(col)
    for g in a.groups:
        groups.add_row(g.name, str(g.width), Text(g.status, style=_STATUS_STYLE[g.status]),
                       f"{g.macs_share:.1%}" if g.status == "dynamic" else "-", ", ".join(g.producers[:3]),
                       "; ".join(g.reasons[:2]))
    parts.append(groups)
    if a.unsupported:
        rej = Table(title="Rejections", title_style="bold red")
        for col in ("layer", "op", "reason", "where"):
            rej.add_column(col)
        for r in a.unsupported:
            rej.add_row(r.node, r.op, r.reason, _rel(r.location))
        parts.append(rej)
    # submodules fx could not trace, kept as black boxes
    if getattr(a, "opaque", None):
        opq = Table(title="Opaque blocks (fx could not trace them; full width in and out)",
                    title_style="bold yellow")
        for col in ("block", "type", "why fx stopped", "where"):
            opq.add_column(col)
        for o in a.opaque:
            opq.add_row(o.name, o.type, o.reason, o.location or "")
        parts.append(opq)
    parts.append(Text(f"MACs {_human(a.macs)} · params {_human(a.params)} · dynamic groups "
                      f"{len(a.dynamic_groups)}/{len(a.groups)} · MACs dcopt can optimise "
                      f"{a.dynamic_fraction:.1%}", style="bold"))
    return RichGroup(*parts)


def count_macs(model: torch.nn.Module, example_inputs) -> int:
    """MACs as ``FlopCounterMode`` counts them (÷2; with the fused CPU attention kernels
    torch does not count, :mod:`dcopt.counting`), with every LSTM by formula,
    the numel of its weights per step, direction and layer (4·H·(I+H), 4·H·(I+P) + P·H with
    ``proj_size``; for a packed sequence, per real step): the
    counter misses the fused float32 LSTM kernel but does see the matmuls of the float64
    fallback, so whatever it saw inside an LSTM is replaced by the formula. The model runs in eval mode (a train-mode run would
    move BatchNorm's running statistics: counting must not change the model) and gets its
    per-module train/eval flags back."""
    from .numcheck import input_tuple

    example_inputs = input_tuple(example_inputs)   # a bare tensor was iterated over its rows
    fc = flop_counter()
    starts: list[int] = []
    correction = [0]

    def pre(m, args):
        starts.append(fc.get_total_flops())

    def post(m, args, out):
        seen = fc.get_total_flops() - starts.pop()
        x = args[0]
        if isinstance(x, PackedSequence):   # only the real (unpadded) steps run: one row each
            rows = x.data.shape[0]
        else:
            rows = x.shape[0] if x.dim() == 2 else x.shape[0] * x.shape[1]
        w = sum(p.numel() for n, p in m.named_parameters() if n.startswith("weight"))
        correction[0] += 2 * rows * w - seen

    lstms = [m for m in model.modules() if isinstance(m, torch.nn.LSTM)]
    handles = [m.register_forward_pre_hook(pre) for m in lstms] + [m.register_forward_hook(post) for m in lstms]
    try:
        with eval_mode(model), torch.no_grad(), parameters_without_grad(model), fc:
            model(*example_inputs)
    finally:
        for h in handles:
            h.remove()
    return (fc.get_total_flops() + correction[0]) // 2


def export_report(dynamic_model, exported: torch.nn.Module, sizes: dict | None = None) -> dict:
    """Per group N → kept, and MACs/params before and after *measured* on the models.

    ``sizes``: as given to ``export(dm, sizes=...)`` (default: the DynamicModel's kept
    sizes). The measured MACs must be those predicted at these sizes; a model exported
    at other sizes is a ``ValueError`` rather than a report whose widths contradict its
    MACs.

    Parameters count as dcopt counts them everywhere (``Analysis.params``,
    ``complexity()``): those the forward uses. A submodule the forward never calls is
    traced away, but an export that is an instance of the user's class keeps it as it
    was; its parameters are reported apart (``params_unused``) rather than added to the
    model's, where they made "after" larger than "before"."""
    from .export import _resolve_sizes
    dm = dynamic_model
    inputs = dm.example_inputs
    kept = _resolve_sizes(dm, sizes)
    groups = [dict(name=g.name, width=g.width, kept=k) for g, k in zip(dm.plan.groups, kept)]
    macs_after = count_macs(exported, inputs)
    predicted = dm._cx.macs_at(kept)
    if macs_after != predicted:
        raise ValueError(f"the exported model costs {macs_after} MACs, but the DynamicModel at "
                         f"{'the sizes given' if sizes else 'its kept sizes'} {dict(zip(dm.group_names, kept))} "
                         f"costs {predicted}: report on the model exported at these sizes (pass the sizes given "
                         "to export as sizes=)")
    named = dict(exported.named_parameters())
    # a GraphModule holds only what its graph reads (BatchNorm folding adds biases the
    # user's layers did not have); an instance of the user's class keeps every submodule
    used = set(named) if isinstance(exported, torch.fx.GraphModule) else set(dm.plan.param_numel)
    params_after = sum(p.numel() for n, p in named.items() if n in used)
    params_unused = sum(p.numel() for n, p in named.items() if n not in used)
    return dict(groups=groups, macs_before=dm.plan.total_macs, macs_after=macs_after,
                params_before=sum(dm.plan.param_numel.values()), params_after=params_after,
                params_unused=params_unused)


def render_export_report(report: dict):
    t = Table(title="dcopt export")
    t.add_column("group")
    t.add_column("N", justify="right")
    t.add_column("kept", justify="right")
    for g in report["groups"]:
        t.add_row(g["name"], str(g["width"]), str(g["kept"]))
    mb, ma = report["macs_before"], report["macs_after"]
    pb, pa = report["params_before"], report["params_after"]
    unused = report.get("params_unused", 0)
    summary = Text(f"MACs {_human(mb)} → {_human(ma)} ({ma / mb:.1%})   params {_human(pb)} → {_human(pa)} "
                   f"({pa / pb:.1%})" + (f"   (+{_human(unused)} params of submodules the forward never calls)"
                                         if unused else ""), style="bold")
    return RichGroup(t, summary)
