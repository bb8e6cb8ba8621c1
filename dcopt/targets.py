"""Turn a command-line TARGET into a model and its example inputs.

The CLI accepts three forms, so that a model can be checked where it already lives::

    path/to/model.py          # executed as Python; defines `model`, build_model(), get_model()
    path/to/model.py:NAME     # same file, the attribute NAME (same as --model NAME)
    package.module:attr       # imported; attr is a module instance or a callable returning one
    torchvision:resnet18      # torchvision.models.get_model(name, weights=None)

A model file is *executed*: point the CLI only at files you trust. Everything that can
go wrong while loading raises :class:`TargetError` with one readable line that names
the file (and line, when the user's code raised), so the CLI can print it as is.
"""
from __future__ import annotations

import ast
import contextlib
import difflib
import importlib
import importlib.util
import inspect
import math
import os
import re
import sys
import sysconfig
import traceback
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from .errors import DcoptError

__all__ = [
    "TargetError",
    "LoadedTarget",
    "load_target",
    "parse_shape",
    "parse_dtype",
    "parse_concrete",
    "concrete_literal",
    "make_inputs",
    "check_forward",
    "one_line",
    "describe_inputs",
    "isolated_imports",
    "unfilled_parameters",
]

#: Names looked up, in order, when a file is given without --model.
MODEL_NAMES = ("model", "build_model", "get_model")
#: Name of the function (or value) providing example inputs in a model file / module.
INPUTS_NAME = "example_inputs"

_DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "float64": torch.float64, "double": torch.float64, "fp64": torch.float64,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "int64": torch.int64, "long": torch.int64,
    "int32": torch.int32, "int": torch.int32,
    "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
}
#: Default input shape of torchvision classification models, and the exceptions.
_TORCHVISION_SHAPES = {"inception_v3": (1, 3, 299, 299)}
_TORCHVISION_DEFAULT = (1, 3, 224, 224)


class TargetError(DcoptError):
    """A TARGET could not be loaded or run; ``str(err)`` is one line fit for a terminal."""


@dataclass
class LoadedTarget:
    """A model ready for :func:`dcopt.analyze`.

    ``source`` says where it came from, e.g. ``examples/crnn_speech.py:build_model()``;
    ``path`` is the file it was defined in (``None`` for installed packages), used by
    ``--format github`` to annotate the file when no finer location is known.
    ``concrete_args`` are the forward's keyword arguments fixed for tracing (``--concrete``),
    to pass on to ``analyze``/``convert``; the forward check already ran with them.
    """
    model: nn.Module
    example_inputs: tuple
    source: str
    path: Optional[str] = None
    concrete_args: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- helpers

def one_line(text: Any, limit: int = 300) -> str:
    """Collapse whitespace (fx and torch messages span lines) and cap the length."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _exc_text(exc: BaseException) -> str:
    msg = one_line(exc)
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _user_frame(exc: BaseException, prefer: Optional[str] = None) -> Optional[str]:
    """``file:line`` of the innermost frame outside torch and dcopt (or inside ``prefer``)."""
    torch_dir = os.path.dirname(torch.__file__)
    dcopt_dir = os.path.dirname(os.path.abspath(__file__))
    found = None
    for fs in traceback.extract_tb(exc.__traceback__):
        fname = fs.filename
        if fname.startswith("<") or fname.startswith(torch_dir) or fname.startswith(dcopt_dir):
            continue
        if "site-packages" in fname and not (prefer and os.path.abspath(fname) == prefer):
            continue
        found = f"{_rel(fname)}:{fs.lineno}"
    return found


def _rel(path: str) -> str:
    """Path relative to the working directory when it lies below it (short, clickable)."""
    try:
        rel = os.path.relpath(path)
    except ValueError:  # other drive on Windows
        return path
    return path if rel.startswith("..") else rel


def _raised(what: str, exc: BaseException, prefer: Optional[str] = None) -> TargetError:
    where = _user_frame(exc, prefer)
    suffix = f" (at {where})" if where else ""
    return TargetError(f"{what} raised {_exc_text(exc)}{suffix}")


def parse_dtype(text: str) -> torch.dtype:
    """``"int64"`` → ``torch.int64``; accepts the usual aliases and a ``torch.`` prefix."""
    key = text.strip().lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {text!r} (choose from float32, float16, bfloat16, float64, "
                         f"int64, int32, bool)")
    return _DTYPES[key]


def parse_shape(text: str) -> tuple[tuple[int, ...], Optional[torch.dtype]]:
    """``"1,3,224,224"`` (or ``1x3x224x224``), optionally ``":int64"`` → (shape, dtype or None)."""
    spec, _, dt = text.strip().partition(":")
    dtype = parse_dtype(dt) if dt else None
    parts = re.split(r"\s*[,x×]\s*", spec.strip().strip("()[]").strip())
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"bad input shape {text!r}: expected integers like 1,3,224,224") from None
    if not shape or any(d <= 0 for d in shape):
        # a zero-size example runs no arithmetic: every count would read 0 MACs and every
        # numeric check would compare empty tensors, so "convertible" would mean nothing
        raise ValueError(f"bad input shape {text!r}: expected positive integers like 1,3,224,224")
    return shape, dtype


_MISSING = object()
#: what ``--concrete NAME=VALUE`` accepts as VALUE: literals only, nothing that runs code
_CONCRETE_TYPES = (type(None), bool, int, float, str)


def concrete_literal(value: Any) -> bool:
    """Whether ``--concrete NAME=VALUE`` can express ``value`` (and ``repr`` writes it)."""
    return isinstance(value, _CONCRETE_TYPES) and not (isinstance(value, float) and not math.isfinite(value))


def parse_concrete(text: str) -> tuple[str, Any]:
    """``"mask=None"`` → ``("mask", None)``: a forward argument fixed for tracing.

    VALUE is read with :func:`ast.literal_eval` and must be None, True/False, a number or
    a quoted string: those are what a forward branches on (``if mask is not None``,
    ``if use_cache``), and a literal cannot run code, unlike ``eval``. A bare word is
    refused rather than guessed as a string, so ``none`` or ``false`` cannot quietly
    mean the string instead of the value."""
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or not name.isidentifier():
        raise ValueError(f"bad --concrete {text!r}: expected NAME=VALUE, e.g. mask=None")
    try:
        parsed = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        parsed = _MISSING
    if parsed is _MISSING or not concrete_literal(parsed):
        raise ValueError(f"bad --concrete {text!r}: VALUE must be None, True, False, a number or a quoted "
                         f"string, quoted past the shell too (--concrete \"mode='fast'\"), got {value.strip()!r}")
    return name, parsed


def make_inputs(shapes: Sequence, dtype: Optional[torch.dtype] = None) -> tuple:
    """Random example inputs: normal floats; integers/bools in {0, 1} (valid token ids for
    any embedding). ``shapes`` holds tuples or ``(shape, dtype)`` pairs from :func:`parse_shape`."""
    out = []
    gen = torch.Generator().manual_seed(0)
    for item in shapes:
        if len(item) == 2 and isinstance(item[0], tuple):
            shape, own = item
        else:
            shape, own = tuple(item), None
        dt = own or dtype or torch.float32
        if dt.is_floating_point:
            out.append(torch.randn(shape, generator=gen).to(dt))
        elif dt == torch.bool:
            out.append(torch.randint(0, 2, shape, generator=gen).bool())
        else:
            out.append(torch.randint(0, 2, shape, generator=gen, dtype=dt))
    return tuple(out)


def describe_inputs(inputs: Sequence) -> str:
    """``1x3x224x224 float32, 2x16 int64`` — for messages."""
    parts = []
    for t in inputs:
        if isinstance(t, torch.Tensor):
            parts.append(f"{'x'.join(map(str, t.shape)) or 'scalar'} {str(t.dtype).removeprefix('torch.')}")
        else:
            parts.append(type(t).__name__)
    return ", ".join(parts) or "no inputs"


def _as_tuple(value: Any, what: str) -> tuple:
    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, (tuple, list)):
        return tuple(value)
    raise TargetError(f"{what} returned {type(value).__name__}; expected a tuple of tensors, "
                      f"e.g. (torch.randn(1, 3, 224, 224),)")


# --------------------------------------------------------------------------- resolving

def _materialize(obj: Any, label: str, prefer: Optional[str]) -> nn.Module:
    """Module instance → itself; nn.Module class → instance (no args); callable → its result."""
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, type) and not issubclass(obj, nn.Module):
        raise TargetError(f"{label} is the class {obj.__name__}, which is not a torch.nn.Module")
    if not callable(obj):
        raise TargetError(f"{label} is a {type(obj).__name__}, not a torch.nn.Module "
                          f"or a function returning one")
    call = f"{label}()"
    try:
        model = obj()
    except TypeError as exc:
        if isinstance(obj, type) and _arity_error(exc):
            raise TargetError(f"cannot instantiate {label} with no arguments ({one_line(exc)}); "
                              f"define build_model() that constructs it instead") from exc
        raise _raised(call, exc, prefer) from exc
    except Exception as exc:
        raise _raised(call, exc, prefer) from exc
    if not isinstance(model, nn.Module):
        raise TargetError(f"{call} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _arity_error(exc: TypeError) -> bool:
    return "argument" in str(exc) and ("missing" in str(exc) or "takes" in str(exc))


def _find_model(namespace: dict, where: str, model_name: Optional[str], prefer: Optional[str]) -> tuple[nn.Module, str]:
    if model_name:
        if model_name not in namespace:
            hint = difflib.get_close_matches(model_name, [k for k in namespace if not k.startswith("_")], n=3)
            extra = f" (did you mean {', '.join(hint)}?)" if hint else ""
            raise TargetError(f"no '{model_name}' in {where}{extra}")
        obj = namespace[model_name]
        label = model_name
    else:
        for name in MODEL_NAMES:
            if name in namespace:
                model_name, obj = name, namespace[name]
                break
        else:
            classes = sorted(k for k, v in namespace.items()
                             if isinstance(v, type) and issubclass(v, nn.Module)
                             and getattr(v, "__module__", None) == namespace.get("__name__"))
            hint = f"; classes defined there: {', '.join(classes)}" if classes else ""
            raise TargetError(f"no model found in {where}: define `model`, a function build_model() "
                              f"or get_model(), or pass --model NAME{hint}")
        label = model_name
    model = _materialize(obj, label, prefer)
    call = label if isinstance(obj, nn.Module) else f"{label}()"
    return model, call


def _find_inputs(namespace: dict, where: str, prefer: Optional[str]) -> Optional[tuple]:
    if INPUTS_NAME not in namespace:
        return None
    obj = namespace[INPUTS_NAME]
    what = f"{INPUTS_NAME}()" if callable(obj) else INPUTS_NAME
    if callable(obj):
        try:
            obj = obj()
        except Exception as exc:
            raise _raised(f"{what} in {where}", exc, prefer) from exc
    return _as_tuple(obj, f"{what} in {where}")


#: folders of the target files executed inside each active :func:`isolated_imports`
_SCOPES: list[set] = []


#: a folder of installed packages, wherever it lies (the user site in a home folder that is
#: also a target's folder, a virtual environment inside the project)
_INSTALLED = frozenset({"site-packages", "dist-packages"})


def _library_dirs() -> list[str]:
    """Where the standard library, installed packages, torch and dcopt live: never a
    target's own. The interpreter's folders, not its prefix: a project may live under
    ``/usr/local`` or ``/opt/conda`` too."""
    paths = sysconfig.get_paths()
    dirs = {paths.get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    dirs |= {os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__))}
    return [os.path.normcase(os.path.abspath(d)) for d in dirs if d]


def _module_file(module: Any) -> Optional[str]:
    try:
        file = getattr(module, "__file__", None)
        if not file:   # a namespace package: no file, only folders
            file = next(iter(getattr(module, "__path__", None) or ()), None)
        return os.path.normcase(os.path.abspath(file)) if isinstance(file, str) else None
    except Exception:  # noqa: BLE001 - odd module objects (lazy proxies) are not the target's
        return None


def _under(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


@contextlib.contextmanager
def isolated_imports() -> Iterator[None]:
    """Load and use one target inside this; afterwards ``sys.path`` is as it was, and the
    modules the target imported *from its own folders* are forgotten.

    A model file runs with its folder on ``sys.path`` so it can import its neighbours,
    as ``python file.py`` would. Python caches every import in ``sys.modules`` by name, so
    without this, ``dcopt check a/net.py b/net.py`` — both doing ``from layers import
    Block`` — analysed b with *a's* ``layers`` (a verdict b alone does not get), and
    a folder added for one target stayed first on the path for the next.

    Which new modules are dropped: those whose file lies under a folder that entered
    ``sys.path`` during the target (the file's folder, the working directory for
    ``module:attr``, what the file added itself) or under the folder of a target file
    executed here (which may have been on the path already), *except* anything in the
    standard library, in a ``site-packages`` or ``dist-packages`` folder anywhere (the
    environment's, the user site, a virtual environment inside the project), in torch
    or in dcopt. Those are the same for every target, and torch and dcopt import
    submodules lazily while a target is analysed: dropping them would make the next
    target import a second copy, whose classes and registries differ from the ones
    already in use. So only the user's own code is re-imported for the next target, as
    a fresh process would. (Modules that were there before the target are kept as they
    were; one the target replaced is put back.)

    It restores on exit, not when :func:`load_target` returns: the model still needs its
    module registered while it is traced, exported and saved (``inspect`` and pickling
    look classes up in ``sys.modules``), and its forward may import a neighbour lazily.
    """
    saved_path = list(sys.path)
    saved_modules = dict(sys.modules)
    folders: set = set()
    _SCOPES.append(folders)
    try:
        yield
    finally:
        del _SCOPES[next(i for i, f in enumerate(_SCOPES) if f is folders)]
        added = [p for p in sys.path if p not in saved_path]
        roots = [os.path.normcase(os.path.abspath(p or os.curdir)) for p in added]
        roots += [os.path.normcase(f) for f in folders]
        sys.path[:] = saved_path
        library = _library_dirs()

        def own(module: Any) -> bool:
            file = _module_file(module)
            return (file is not None and _under(file, roots) and not _under(file, library)
                    and not _INSTALLED.intersection(file.split(os.sep)))

        for name, module in list(sys.modules.items()):
            old = saved_modules.get(name, _MISSING)
            if module is old or not own(module):
                continue
            if old is _MISSING:
                del sys.modules[name]
            else:   # the target replaced a module of that name: put the earlier one back
                sys.modules[name] = old


def _exec_file(path: str) -> dict:
    """Execute a model file as a fresh module and return its namespace."""
    abspath = os.path.abspath(path)
    if not os.path.exists(path):
        raise TargetError(f"file not found: {path}")
    if os.path.isdir(path):
        raise TargetError(f"{path} is a directory; expected a Python file defining the model")
    try:
        with open(abspath, "rb") as f:
            source = f.read()
    except OSError as exc:
        raise TargetError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        code = compile(source, abspath, "exec")
    except SyntaxError as exc:
        where = f"{_rel(exc.filename or abspath)}:{exc.lineno}" if exc.lineno else path
        raise TargetError(f"syntax error in {where}: {exc.msg}") from exc
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(abspath))[0])
    mod_name = f"dcopt_target_{stem}"
    spec = importlib.util.spec_from_file_location(mod_name, abspath)
    module = importlib.util.module_from_spec(spec)
    # Registered so dataclasses, pickling and `typing` inside the file resolve the module;
    # the file's folder on sys.path so it can import its neighbours, as `python file.py` would.
    sys.modules[mod_name] = module
    folder = os.path.dirname(abspath)
    if _SCOPES:
        _SCOPES[-1].add(folder)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        exec(code, module.__dict__)
    except SystemExit as exc:
        raise TargetError(f"{path} called sys.exit({exc.code}) while being loaded; guard scripts with "
                          f"`if __name__ == \"__main__\":`") from exc
    except Exception as exc:
        raise _raised(f"executing {path}", exc, abspath) from exc
    return module.__dict__


def _load_file(path: str, model_name: Optional[str]) -> tuple[nn.Module, Optional[tuple], str]:
    ns = _exec_file(path)
    prefer = os.path.abspath(path)
    model, call = _find_model(ns, path, model_name, prefer)
    inputs = _find_inputs(ns, path, prefer)
    return model, inputs, f"{path}:{call}"


def _load_module_attr(spec: str, model_name: Optional[str]) -> tuple[nn.Module, Optional[tuple], str, Optional[str]]:
    mod_path, _, attr = spec.partition(":")
    attr = attr or model_name or ""
    if not mod_path or not attr:
        raise TargetError(f"bad TARGET {spec!r}: expected module.path:attr")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)  # `dcopt check pkg.models:net` from the project root, as python -m does
    try:
        module = importlib.import_module(mod_path)
    except ModuleNotFoundError as exc:
        if exc.name and (mod_path == exc.name or mod_path.startswith(exc.name + ".")):
            raise TargetError(f"cannot import module '{mod_path}': no module named '{exc.name}'") from exc
        raise _raised(f"importing '{mod_path}'", exc) from exc
    except SyntaxError as exc:
        where = f"{_rel(exc.filename)}:{exc.lineno}" if exc.filename else mod_path
        raise TargetError(f"syntax error in {where}: {exc.msg}") from exc
    except Exception as exc:
        raise _raised(f"importing '{mod_path}'", exc) from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [k for k in vars(module) if not k.startswith("_")]
            hint = difflib.get_close_matches(part, names, n=3)
            extra = f" (did you mean {', '.join(hint)}?)" if hint else ""
            raise TargetError(f"module '{mod_path}' has no attribute '{attr}'{extra}")
        obj = getattr(obj, part)
    file = getattr(module, "__file__", None)
    prefer = os.path.abspath(file) if file else None
    model = _materialize(obj, f"{mod_path}:{attr}", prefer)
    inputs = _find_inputs(vars(module), f"module '{mod_path}'", prefer)
    label = f"{mod_path}:{attr}" + ("" if isinstance(obj, nn.Module) else "()")
    return model, inputs, label, _rel(file) if file else None


def _load_torchvision(name: str) -> tuple[nn.Module, tuple[int, ...], str]:
    try:
        import torchvision
    except ImportError as exc:
        raise TargetError("torchvision is not installed (pip install torchvision)") from exc
    available = torchvision.models.list_models()
    if name not in available:
        hint = difflib.get_close_matches(name, available, n=3)
        extra = f" (did you mean {', '.join(hint)}?)" if hint else ""
        raise TargetError(f"torchvision has no model '{name}'{extra}")
    kwargs: dict[str, Any] = {"weights": None}
    if name in ("inception_v3", "googlenet"):
        kwargs["init_weights"] = True  # silences torchvision's FutureWarning; same default
    try:
        model = torchvision.models.get_model(name, **kwargs)
    except Exception as exc:
        raise _raised(f"torchvision.models.get_model('{name}', weights=None)", exc) from exc
    return model, _TORCHVISION_SHAPES.get(name, _TORCHVISION_DEFAULT), f"torchvision.models.{name}(weights=None)"


# --------------------------------------------------------------------------- public

def load_target(spec: str, *, model_name: Optional[str] = None, input_shapes: Optional[Sequence] = None,
                dtype: Optional[torch.dtype | str] = None, run_forward: bool = True,
                concrete_args: Optional[dict] = None) -> LoadedTarget:
    """Build the model a TARGET names, with example inputs, and (``run_forward``) check
    that the model's forward accepts them.

    ``input_shapes`` (shapes, or ``(shape, dtype)`` pairs, or strings ``"1,3,224,224"``)
    override the file's ``example_inputs()``; ``dtype`` is the dtype of those inputs.
    ``concrete_args`` (``{"mask": None}``) are forward arguments fixed for tracing; they
    must name parameters of the forward that the example inputs leave unfilled.

    A model file may import its neighbours, which stay cached in ``sys.modules``: to load
    several targets in one process, load and use each inside :func:`isolated_imports`.

    >>> t = load_target("torchvision:resnet18")          # doctest: +SKIP
    >>> t.example_inputs[0].shape
    torch.Size([1, 3, 224, 224])
    """
    if isinstance(dtype, str):
        try:
            dtype = parse_dtype(dtype)
        except ValueError as exc:
            raise TargetError(str(exc)) from None
    shapes = None
    if input_shapes:
        shapes = []
        for s in input_shapes:
            if isinstance(s, str):
                try:
                    s = parse_shape(s)
                except ValueError as exc:
                    raise TargetError(str(exc)) from None
            shapes.append(s)

    path: Optional[str] = None
    file_spec = re.fullmatch(r"(.+\.py):([A-Za-z_][\w.]*)", spec)
    if spec.startswith("torchvision:"):
        if model_name:
            raise TargetError("--model applies to file targets; for torchvision write torchvision:NAME")
        model, default_shape, source = _load_torchvision(spec.split(":", 1)[1])
        inputs = None if shapes else make_inputs([default_shape], dtype)
    elif file_spec and not os.path.exists(spec):
        if model_name and model_name != file_spec.group(2):
            raise TargetError(f"TARGET {spec} names '{file_spec.group(2)}' but --model says '{model_name}'")
        path = file_spec.group(1)
        model, inputs, source = _load_file(path, file_spec.group(2))
    elif spec.endswith(".py") or os.path.sep in spec or os.path.exists(spec):
        path = spec
        model, inputs, source = _load_file(spec, model_name)
    elif ":" in spec:
        model, inputs, source, path = _load_module_attr(spec, model_name)
    else:
        raise TargetError(f"cannot interpret TARGET {spec!r}: expected path/to/model.py, "
                          f"module.path:attr or torchvision:NAME")

    if shapes:
        inputs = make_inputs(shapes, dtype)
    elif inputs is None:
        raise TargetError(f"no example inputs for {source}: define example_inputs() in the file, "
                          f"or pass --input-shape, e.g. --input-shape 1,3,224,224")
    elif dtype is not None and not spec.startswith("torchvision:"):
        raise TargetError("--dtype applies to the inputs built from --input-shape; "
                          "example_inputs() already sets its own dtypes")
    concrete = dict(concrete_args or {})
    _check_concrete(model, inputs, concrete)
    target = LoadedTarget(model=model, example_inputs=inputs, source=source, path=path, concrete_args=concrete)
    if run_forward:
        check_forward(target)
    return target


def forward_parameters(model: nn.Module) -> Optional[list[inspect.Parameter]]:
    """The parameters of ``model.forward`` (without self); None when Python cannot tell."""
    try:
        return list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None


def unfilled_parameters(target: LoadedTarget) -> list[inspect.Parameter]:
    """Forward parameters with a default that neither the example inputs nor
    ``concrete_args`` give a value: torch.fx traces each as an *input* (a proxy that is
    never None, whose truth it cannot decide), not as its default — the usual cause of a
    forward with ``if mask is not None:`` failing to trace."""
    params = forward_parameters(target.model) or []
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    out = []
    for i, p in enumerate(params):
        if p.kind in positional and i < len(target.example_inputs):
            continue
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        if p.default is not inspect.Parameter.empty and p.name not in target.concrete_args:
            out.append(p)
    return out


def _check_concrete(model: nn.Module, inputs: tuple, concrete: dict) -> None:
    """A ``--concrete`` name must be a forward parameter the example inputs leave free:
    fx would otherwise fail later with a message about its own internals, or pass the
    value twice."""
    if not concrete:
        return
    params = forward_parameters(model)
    if params is None or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    by_name = {p.name: (i, p) for i, p in enumerate(params)}
    names = ", ".join(p.name for p in params) or "none"
    for name in concrete:
        if name not in by_name:
            hint = difflib.get_close_matches(name, list(by_name), n=1)
            extra = f"; did you mean {hint[0]}?" if hint else ""
            raise TargetError(f"--concrete {name}: {type(model).__name__}.forward has no parameter '{name}' "
                              f"(its parameters: {names}){extra}")
        i, p = by_name[name]
        if p.kind is inspect.Parameter.POSITIONAL_ONLY:
            raise TargetError(f"--concrete {name}: '{name}' is a positional-only parameter of "
                              f"{type(model).__name__}.forward and cannot be given by name")
        if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and i < len(inputs):
            raise TargetError(f"--concrete {name}: the example inputs already give '{name}' "
                              f"(input {i + 1} of {len(inputs)}); fix only parameters after them")


def check_forward(target: LoadedTarget) -> None:
    """Run the model once (eval mode, no grad) so a wrong input shape is reported as such,
    with the user's line, before tracing turns it into something vaguer."""
    model = target.model
    flags = {name: m.training for name, m in model.named_modules()}
    model.eval()
    prefer = os.path.abspath(target.path) if target.path else None
    try:
        with torch.no_grad():
            model(*target.example_inputs, **target.concrete_args)
    except Exception as exc:
        where = _user_frame(exc, prefer)
        suffix = f" at {where}" if where else ""
        raise TargetError(f"the model's forward failed on the example inputs "
                          f"({describe_inputs(target.example_inputs)}){suffix}: {_exc_text(exc)}") from exc
    finally:
        for name, m in model.named_modules():
            m.training = flags[name]
