"""Containers a model builds around tensors: an ``OrderedDict`` (traced as a call of its
constructor: :meth:`~dcopt.trace.DcoptTracer.create_arg`) and the user's namedtuples.

They hold tensors without computing anything, so their value is the same container of
the values they hold: the model output, an index (``t[0]``) or a field (``t.a``) then
sees the tracked features inside, and the analysis says "reaches the model output"
instead of "no rule for OrderedDict".
"""
from __future__ import annotations

import collections

import torch

from .registry import NAMEDTUPLE, register_rule


def _values(ctx, args):
    return torch.fx.node.map_arg(args, ctx.value)


@register_rule(collections.OrderedDict)
def ordered_dict(ctx):
    (items,) = ctx.node.args      # DcoptTracer writes OrderedDict(<dict>); another form is unknown
    if ctx.node.kwargs or not isinstance(items, dict):
        raise TypeError("not the OrderedDict(<dict>) form dcopt traces")
    return collections.OrderedDict(_values(ctx, items))


@register_rule(NAMEDTUPLE)
def namedtuple(ctx):
    return ctx.node.target(*_values(ctx, ctx.node.args), **_values(ctx, ctx.node.kwargs))
