"""What every benchmark needs when it writes its results."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

__all__ = ["json_safe"]


def json_safe(obj, digits: int = 6):
    """``obj`` made fit for ``json.dumps``: floats to ``digits`` significant digits
    (non-finite ones to None: JSON has no NaN), tuples to lists, numpy and torch values
    to Python ones, paths to strings, dict keys to strings."""
    if isinstance(obj, float):
        return None if not math.isfinite(obj) else float(f"{obj:.{digits}g}")
    if isinstance(obj, dict):
        return {str(k): json_safe(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v, digits) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return json_safe(obj.item(), digits)
    if isinstance(obj, torch.Tensor):
        return json_safe(obj.tolist(), digits)
    if isinstance(obj, Path):
        return str(obj)
    return obj
