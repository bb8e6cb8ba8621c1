"""Typed exceptions. Each carries the fx node (by name) and the user's source line, so a
report can say *where* in the user's code dcopt stopped, not only *that* it stopped."""
from __future__ import annotations

import re
from typing import Optional

__all__ = [
    "DcoptError",
    "TraceError",
    "TraceRefusal",
    "ConversionError",
    "UnsupportedOpError",
    "ExportError",
    "source_location",
]

_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def source_location(stack_trace: Optional[str]) -> Optional[str]:
    """`file:line` of the innermost user frame in an fx ``node.stack_trace``.

    fx records the whole Python stack at the time an op was traced; the last frame is
    the line of the user's ``forward`` that created the op, which is what a person
    wants to jump to.
    """
    if not stack_trace:
        return None
    frames = [f for f in _FRAME.findall(stack_trace) if not _is_library(f[0])]
    if not frames:
        return None
    path, line = frames[-1]
    return f"{path}:{line}"


def _is_library(path: str) -> bool:
    import os
    import torch
    return path.startswith(os.path.dirname(torch.__file__)) or path.startswith(os.path.dirname(__file__))


class DcoptError(Exception):
    """Base class of everything dcopt raises on purpose."""

    def __init__(self, message: str, *, node: Optional[str] = None, location: Optional[str] = None):
        self.message = message
        self.node = node
        self.location = location
        super().__init__(self._format())

    def _format(self) -> str:
        where = f" ({self.location})" if self.location else ""
        return f"{self.message}{where}"


class TraceError(DcoptError):
    """torch.fx could not trace the model; the message names the module, the line and a way out."""

    def __init__(self, message: str, *, module: Optional[str] = None, location: Optional[str] = None,
                 suggestion: Optional[str] = None):
        self.module = module
        self.suggestion = suggestion
        super().__init__(message, location=location)

    def _format(self) -> str:
        parts = [self.message]
        if self.module is not None:
            parts.append(f"in module '{self.module or '<root>'}'")
        if self.location:
            parts.append(f"at {self.location}")
        text = " ".join(parts)
        if self.suggestion:
            text += f". {self.suggestion}"
        return text


class TraceRefusal(TraceError):
    """Raised while tracing when dcopt knows the module cannot be converted as called
    (not a failure of fx's): reported as it is, never retried another way or made an
    opaque leaf, whose measuring would fail the same way."""


class ConversionError(DcoptError):
    """`convert(strict=True)` found layers it had to keep fixed; `.rejections` lists them."""

    def __init__(self, message: str, rejections=()):
        self.rejections = list(rejections)
        super().__init__(message)


class UnsupportedOpError(DcoptError):
    """An op dcopt has no exact rule for was asked to change width."""


class ExportError(DcoptError):
    """The reverse pass could not produce an exact smaller model."""
