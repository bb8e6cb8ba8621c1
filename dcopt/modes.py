"""Run a module in eval mode for a moment and give every submodule its own flag back.

Why per submodule: ``module.train(was)`` sets *every* submodule to ``was``, and a model
whose parts are in different modes (a frozen, eval-mode encoder inside a training model)
would come back changed. dcopt measures, checks and converts users' models; none of that
may leave a flag other than it found it.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

__all__ = ["eval_mode"]


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``with eval_mode(m): m(x)`` runs ``m`` in eval mode (BatchNorm does not update its
    statistics, dropout is off) and restores each submodule's flag afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training
