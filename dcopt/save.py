"""Write an exported model in forms that load with torch alone (no dcopt, no pickle of code).

* ``<dir>/__init__.py`` — standalone Python: the module tree built from ``torch.nn``
  constructors, the fx-generated ``forward``, and ``load()`` which reads
  ``weights.pt`` with ``weights_only=True``. Use::

      import importlib.util, sys
      spec = importlib.util.spec_from_file_location("small", "out/small/__init__.py")
      small = importlib.util.module_from_spec(spec); spec.loader.exec_module(small)
      model = small.load()

* ``<dir>/model.pt2`` — a ``torch.export`` program (when example inputs are given and
  the model exports): ``torch.export.load("out/small/model.pt2").module()``.
"""
from __future__ import annotations

import importlib.util
import inspect
import logging
import math
import os
import textwrap
import types
import uuid
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.fx
from torch import nn

from .errors import ExportError
from .modes import eval_mode
from .trace import DcoptTracer

__all__ = ["save_exported", "load_exported"]


#: names a constructor expression may use besides ``torch`` (the repr of an infinite or nan float)
_NAMES = {"inf": math.inf, "nan": math.nan}


def _same_value(a, b) -> bool:
    """``a`` and ``b`` are the same setting: of one type and equal (nan equals nan)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(map(_same_value, a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - an == that gives no truth value (an array): not known equal
        return False


def _settings(module: nn.Module) -> dict:
    """What a layer computes with besides its tensors and children: its public attributes
    (``AvgPool2d.ceil_mode``, ``Upsample.align_corners``, ``RNN.nonlinearity``, ...)."""
    return {k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training"}


def _tensors(module: nn.Module) -> dict:
    """Each parameter's and buffer's name, kind and shape: what weights.pt must fit."""
    named = list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False))
    return {name: (isinstance(t, nn.Parameter), tuple(t.shape)) for name, t in named}


def _difference(original: nn.Module, rebuilt: nn.Module) -> Optional[str]:
    """How ``rebuilt`` differs from ``original``, or None. A constructor argument that
    ``repr`` leaves out (``AvgPool2d(2, ceil_mode=True)`` prints as ``AvgPool2d(kernel_size=2,
    stride=2, padding=0)``) shows here as an attribute that differs; the tensors are loaded
    from weights.pt, so of them only names, kinds and shapes (not dtypes) must agree."""
    mods, again = dict(original.named_modules()), dict(rebuilt.named_modules())
    if {k: type(m) for k, m in mods.items()} != {k: type(m) for k, m in again.items()}:
        return "its submodules differ"
    for prefix, m in mods.items():
        a, b = _settings(m), _settings(again[prefix])
        for key in sorted(a.keys() | b.keys()):
            if key not in a or key not in b or not _same_value(a[key], b[key]):
                said = [repr(s[key]) if key in s else "not a setting" for s in (a, b)]
                return f"{prefix + '.' if prefix else ''}{key} is {said[0]}, rebuilt {said[1]}"
        if m._non_persistent_buffers_set != again[prefix]._non_persistent_buffers_set:
            return f"{prefix or 'it'} keeps other buffers out of its state dict"
    if _tensors(original) != _tensors(rebuilt) or original.state_dict().keys() != rebuilt.state_dict().keys():
        return "its parameters or buffers differ"
    return None


def _arguments(cls: type) -> list[inspect.Parameter]:
    """The constructor arguments of ``cls``. RNN, LSTM and GRU take ``*args, **kwargs``:
    theirs are RNNBase's without ``mode`` (which ``nonlinearity`` sets for RNN), and
    ``proj_size`` for LSTM only."""
    if cls in (nn.RNN, nn.LSTM, nn.GRU):
        params = [p for p in inspect.signature(nn.RNNBase.__init__).parameters.values()
                  if p.name not in ("self", "mode") and (p.name != "proj_size" or cls is nn.LSTM)]
        if cls is nn.RNN:
            params.append(inspect.Parameter("nonlinearity", inspect.Parameter.KEYWORD_ONLY, default="tanh"))
        return params
    return [p for p in list(inspect.signature(cls.__init__).parameters.values())[1:]
            if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]


def _call_from_attributes(module: nn.Module) -> tuple[Optional[str], str]:
    """``torch.nn.X(name=value, ...)`` for every constructor argument the layer keeps as an
    attribute of that name (a ``bias=`` flag: whether its bias tensor exists), with the
    values' repr (so strings are quoted: ``padding='same'``); or None and why not."""
    cls = type(module)
    kept, missing, unwritable = [], [], []
    for p in _arguments(cls):
        name = p.name
        if name.startswith("_") or name in ("device", "dtype"):
            continue
        if (name in module._parameters or name in module._buffers) and isinstance(p.default, bool):
            value = getattr(module, name) is not None
        elif name in module._parameters or name in module._buffers or name in module._modules or \
                name not in vars(module):
            if p.default is inspect.Parameter.empty:
                missing.append(name)
            continue
        else:
            value = vars(module)[name]
        # every argument written out, defaults too: the saved code must build this layer
        # under a torch whose defaults have changed, not what that torch would default to
        text = repr(value)
        try:
            literal = _same_value(eval(text, {"torch": torch, **_NAMES}), value)
        except Exception:  # noqa: BLE001 - any failure means: not a literal
            literal = False
        if not literal:
            unwritable.append(f"its {name} {text} is not a Python literal")
        kept.append(f"{name}={text}")
    if missing:
        return None, f"no attribute holds its argument(s) {', '.join(missing)}"
    if unwritable:
        return None, "; ".join(unwritable)
    return f"torch.nn.{cls.__name__}({', '.join(kept)})", ""


def _call_from_repr(module: nn.Module) -> tuple[Optional[str], str]:
    text = repr(module)
    if "\n" in text:
        return None, "its repr spans several lines"
    return f"torch.nn.{text}", ""


def _rebuild(module: nn.Module) -> tuple[Optional[str], str]:
    """A ``torch.nn.X(...)`` expression that rebuilds ``module`` and '', or None and why not.

    An expression counts only if the layer it builds has the same settings, submodules and
    tensor shapes as ``module`` (:func:`_difference`): ``repr`` leaves out arguments, so an
    expression read from it alone could build another layer that still loads the weights.
    It is built on the meta device: no memory, no draw from the random generator."""
    cls = type(module)
    if not cls.__module__.startswith("torch.nn") or getattr(nn, cls.__name__, None) is not cls:
        return None, "not a plain torch.nn layer"
    if any(m._forward_hooks or m._forward_pre_hooks for m in module.modules()):
        return None, "it has forward hooks, which a layer built from its constructor would not run"
    tried, reasons = set(), []
    for how, make in (("from its attributes", _call_from_attributes), ("from its repr", _call_from_repr)):
        expr, why = make(module)
        if expr is not None and expr not in tried:
            tried.add(expr)
            try:
                with warnings.catch_warnings(), torch.device("meta"):
                    warnings.simplefilter("ignore")        # e.g. RNN's note on dropout with one layer
                    rebuilt = eval(expr, {"torch": torch, **_NAMES})
                    diff = _difference(module, rebuilt)
            except Exception as exc:  # noqa: BLE001 - the expression does not build a layer
                why = f"{expr} fails: {type(exc).__name__}: {exc}"
            else:
                if diff is None:
                    return expr, ""
                why = f"{expr} builds another layer: {diff}"
        if why:
            reasons.append(f"{how}, {why}")
    return None, "a torch.nn layer that no constructor call rebuilds (" + "; ".join(reasons) + ")"


def _constructor(module: nn.Module) -> Optional[str]:
    """A ``torch.nn.X(...)`` expression that rebuilds ``module`` (checked), or None."""
    return _rebuild(module)[0]


def _as_graph_module(model: nn.Module) -> torch.fx.GraphModule:
    if isinstance(model, torch.fx.GraphModule):
        return model
    tracer = DcoptTracer()
    graph = tracer.trace(model)
    return torch.fx.GraphModule(tracer.root, graph, type(model).__name__)


def _imports(globals_: dict) -> list[str]:
    """Import lines for the names the fx-generated code uses."""
    import builtins
    from torch.fx.graph import _custom_builtins

    lines = []
    for name, value in sorted(globals_.items()):
        if name in ("torch", "__builtins__") or getattr(builtins, name, object()) is value:
            continue
        if name in _custom_builtins:
            lines.append(_custom_builtins[name].import_str)
        elif isinstance(value, types.ModuleType):
            lines.append(f"import {value.__name__} as {name}")
        elif getattr(value, "__module__", None) and getattr(value, "__qualname__", None):
            mod, qual = value.__module__, value.__qualname__
            if "<" in qual:
                raise ExportError(f"the model calls {qual}, which cannot be imported by name")
            if mod == "__main__":
                # another process's __main__ is another script (and fx's name for it,
                # '__main___X', would be mangled inside the generated class)
                raise ExportError(f"the model uses {qual}, defined in the script being run (__main__); the "
                                  "standalone code must import it by name: define it in a module")
            owner, _, rest = qual.partition(".")
            lines.append(f"from {mod} import {owner} as {name}" if not rest else
                         f"from {mod} import {owner} as _{name}_owner\n{name} = _{name}_owner.{rest}")
        else:
            lines.append(f"{name} = {value!r}")
    return lines


_TEMPLATE = '''\
"""Exported by dcopt: plain PyTorch, loads without dcopt. Call load() for the model."""
import os

import torch
{imports}


def _child(root, path):
    obj = root
    for part in path.split("."):
        if not hasattr(obj, part):
            obj.add_module(part, torch.nn.Module())
        obj = getattr(obj, part)
    return obj


def _place(root, qualname, value):
    parent, _, name = qualname.rpartition(".")
    owner = _child(root, parent) if parent else root
    if isinstance(value, torch.nn.Module):
        owner.add_module(name, value)
    elif isinstance(value, torch.nn.Parameter):
        owner.register_parameter(name, value)
    else:
        owner.register_buffer(name, value)


class {name}(torch.nn.Module):
    def __init__(self):
        super().__init__()
{body}

{forward}


def load(map_location="cpu"):
    """The model with its trained weights (read with weights_only=True), in their saved dtypes."""
    model = {name}()
    state = torch.load(os.path.join(os.path.dirname(__file__), "weights.pt"), map_location=map_location,
                       weights_only=True)
    # assign: the module takes the saved tensors themselves, in their dtype (float64, bfloat16, ...)
    # and on map_location, where copying into the float32 CPU tensors built above would not
    model.load_state_dict(state, assign=True)
    return model.eval()
'''


def _inside(qual: str, targets: set) -> bool:
    """Whether tensor ``qual`` belongs to one of the ``targets`` (or to a submodule of one,
    as ``attn.out_proj.weight`` to a MultiheadAttention ``attn``): its constructor makes it."""
    parts = qual.split(".")[:-1]
    return any(".".join(parts[:i]) in targets for i in range(1, len(parts) + 1))


def _python_source(model: nn.Module, class_name: str) -> tuple[str, dict]:
    """Standalone source for ``model`` and the state dict it loads; raises ExportError."""
    try:
        gm = _as_graph_module(model)
    except Exception as exc:
        raise ExportError(f"cannot write standalone code: fx cannot trace the exported model ({exc})") from exc
    body = []
    targets = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for qual in sorted(targets):
        expr, why = _rebuild(gm.get_submodule(qual))
        if expr is None:
            raise ExportError(f"cannot write standalone code for module '{qual}' "
                              f"({type(gm.get_submodule(qual)).__name__}): {why}")
        body.append(f"        _place(self, {qual!r}, {expr})")
    for qual, t in list(gm.named_parameters()) + list(gm.named_buffers()):
        if _inside(qual, targets):
            continue
        ctor = "torch.nn.Parameter(torch.empty({}, dtype={}))" if isinstance(t, nn.Parameter) else \
            "torch.empty({}, dtype={})"
        body.append(f"        _place(self, {qual!r}, {ctor.format(list(t.shape), t.dtype)})")
    python_code = gm.graph.python_code(root_module="self")
    text = _TEMPLATE.format(imports="\n".join(_imports(python_code.globals)), name=class_name,
                            body="\n".join(body or ["        pass"]),
                            forward=textwrap.indent(textwrap.dedent(gm.code).strip("\n"), "    "))
    state = gm.state_dict()
    # a non-persistent buffer is not in the state dict, but the forward reads its value: the
    # standalone code registers every buffer it places (persistent), so weights.pt carries it
    for qual, t in gm.named_buffers():
        if not _inside(qual, targets) and qual not in state:
            state[qual] = t
    return text, state


def save_exported(model: nn.Module, path, example_inputs: Optional[Sequence] = None, *,
                  class_name: str = "ExportedModel", check: bool = True) -> Path:
    """Save an exported model so that it loads with torch alone; returns the folder.

    Writes ``__init__.py`` (standalone code + ``load()``) with ``weights.pt`` and, with
    ``example_inputs``, ``model.pt2`` (torch.export). A model that contains a block only
    its own class can run (an opaque, untraceable block) cannot be written as standalone
    code; then ``model.pt2`` alone is written (``WHY.txt`` says why), and if neither form
    can be written an :class:`~dcopt.ExportError` is raised. With ``check`` what was
    written is loaded back and compared with ``model`` on the example inputs (relative
    error ≤ 1e-5, with :mod:`dcopt.numcheck`'s float64 second opinion); a saved form that
    fails is removed, not left to be loaded. ``model.pt2`` is read back with
    ``torch.export.load`` even without ``check``: one it cannot read is left out (WHY.txt
    says why). ``load()`` gives the weights in their saved dtype. Files of an earlier save
    into the same folder (``model.pt2``, ``__init__.py``, ``weights.pt``, ``WHY.txt``) are
    replaced or removed first, so the folder never mixes two models; but only files that
    an earlier save wrote (see :func:`_refuse_files_in_the_way`): any other file of those
    names is left alone and an :class:`~dcopt.ExportError` names it, before anything is
    written. ``model``'s train/eval flags are restored.

    Example::

        dcopt.save_exported(small, "out/small", example_inputs=(x,))
    """
    folder = Path(path)
    _refuse_files_in_the_way(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if example_inputs is not None and isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    for name in _WRITTEN + ("WHY.txt",):
        (folder / name).unlink(missing_ok=True)
    with eval_mode(model):
        _write(model, folder, None if example_inputs is None else tuple(example_inputs), class_name, check)
    return folder


#: the saved model runs the same ops as the model: anything above rounding is a fault
SAVE_TOL = 1e-5
_WRITTEN = ("model.pt2", "__init__.py", "weights.pt")
#: the first line of every WHY.txt save_exported writes: how a later save knows the file is its own
_WHY_HEAD = "Written by dcopt.save_exported: the forms it left out of this folder, and why."
#: how the WHY.txt of a dcopt from before _WHY_HEAD began
_OLD_WHY_STARTS = ("model.pt2 not written", "__init__.py not written", "nothing kept")


def _dcopt_wrote(file: Path) -> bool:
    """Whether ``file`` (an ``__init__.py`` or ``WHY.txt``) begins as save_exported writes it."""
    starts = (_TEMPLATE.partition(":")[0],) if file.name == "__init__.py" else (_WHY_HEAD,) + _OLD_WHY_STARTS
    try:
        with open(file, "rb") as f:
            head = f.read(200).decode("utf-8", "replace")
    except OSError:
        return False
    return file.is_file() and head.startswith(starts)


def _refuse_files_in_the_way(folder: Path) -> None:
    """ExportError naming a file that save_exported would replace or remove but did not write.

    An ``__init__.py`` is dcopt's when it begins with the docstring dcopt writes (a user's
    package's is not), a ``WHY.txt`` when it begins with :data:`_WHY_HEAD`. ``weights.pt``
    and ``model.pt2`` cannot say who wrote them: they are taken for dcopt's when the
    folder's ``__init__.py`` is dcopt's or, without an ``__init__.py``, its ``WHY.txt`` is
    (a save that wrote ``model.pt2`` alone, or nothing). In any other folder each of the
    four is the user's, and so is anything of those names that is not a plain file."""
    init = folder / "__init__.py"
    ours = _dcopt_wrote(init) if os.path.lexists(init) else _dcopt_wrote(folder / "WHY.txt")
    for name in ("__init__.py",) + _WRITTEN + ("WHY.txt",):
        file = folder / name
        if os.path.lexists(file) and not (ours and file.is_file() and not file.is_symlink()):
            raise ExportError(
                f"{file} is in the way: save_exported replaces only the files an earlier save_exported "
                "wrote (a folder whose __init__.py, or else WHY.txt, begins as dcopt writes it), and "
                "this one it did not write; move it, or save into another folder")


def _write(model: nn.Module, folder: Path, example_inputs: Optional[tuple], class_name: str, check: bool) -> None:
    notes = []
    program = None
    if example_inputs is not None:
        program, note = _write_program(model, folder / "model.pt2", example_inputs)
        if note:
            notes.append(note)
    program_ok = program is not None
    try:
        text, state = _python_source(model, class_name)
        (folder / "__init__.py").write_text(text)
        torch.save(state, folder / "weights.pt")
        python_ok = True
    except ExportError as exc:
        notes.append(f"__init__.py not written: {exc}")
        python_ok = False
    if notes:
        (folder / "WHY.txt").write_text("\n".join([_WHY_HEAD] + notes) + "\n")
    if not (python_ok or program_ok):
        raise ExportError("could not save the model in a form that loads without dcopt: " + "; ".join(notes))
    if check and example_inputs is not None:
        try:
            failure = _check_saved(model, folder, example_inputs, python_ok, program)
        except Exception as exc:  # noqa: BLE001 - what was written does not even load back
            failure = f"loading it back failed: {type(exc).__name__}: {exc}"
        if failure is not None:
            # a saved model that does not reproduce the model must not stay where it would be loaded
            for name in _WRITTEN:
                (folder / name).unlink(missing_ok=True)
            (folder / "WHY.txt").write_text(f"{_WHY_HEAD}\nnothing kept: {failure}\n")
            raise ExportError(f"the saved model at {folder} does not reproduce the model ({failure}); "
                              "the files were removed. Please report this model: it is a dcopt bug")


def _write_program(model: nn.Module, file: Path, example_inputs: tuple) -> tuple[Optional[nn.Module], Optional[str]]:
    """``torch.export`` ``model`` into ``file`` and load it back: the loaded program's module
    and None, or None and the WHY.txt line saying why no ``file`` is left. torch can write
    part of a file before it fails (an output it cannot serialise), and can save a program
    it cannot load (a str among the outputs): neither is a model.pt2."""
    try:
        with warnings.catch_warnings():
            # torch's own note on every RNN (it re-assigns _flat_weights while exporting):
            # harmless, and the saved program is checked against the model below
            warnings.filterwarnings("ignore", message=r".*_flat_weights.*were assigned during export")
            program = torch.export.export(model, example_inputs)
    except Exception as exc:  # noqa: BLE001 - some models cannot be torch.export-ed
        return None, f"model.pt2 not written: torch.export failed: {type(exc).__name__}: {exc}"
    try:
        torch.export.save(program, file)
    except Exception as exc:  # noqa: BLE001
        file.unlink(missing_ok=True)
        return None, f"model.pt2 not written: torch.export.save failed: {type(exc).__name__}: {exc}"
    log = logging.getLogger("torch.export")
    level = log.level
    log.setLevel(logging.ERROR)         # torch logs a traceback before it raises (or falls back)
    try:
        return torch.export.load(file).module(), None
    except Exception as exc:  # noqa: BLE001
        file.unlink(missing_ok=True)
        return None, (f"model.pt2 not written: torch.export.load cannot read back what torch.export.save "
                      f"wrote: {type(exc).__name__}: {exc}")
    finally:
        log.setLevel(level)


def _check_saved(model: nn.Module, folder: Path, inputs: tuple, python_ok: bool,
                 program: Optional[nn.Module]) -> Optional[str]:
    """Load what was written and compare it with ``model`` on ``inputs``; a reason, or None.

    The saved forms run the same ops as the model, so their float32 results should agree
    to rounding; a rounding-noise output (e.g. the mean of a normalised tensor) still gets
    numcheck's float64 second opinion before it is called a fault."""
    from .numcheck import agreement, float64_copy, to_float64

    loaded = []
    if python_ok:
        loaded.append(("__init__.py", load_exported(folder)))
    if program is not None:                       # loaded back by _write_program
        loaded.append(("model.pt2", program))
    with torch.no_grad():
        expected = model(*inputs)
        for what, m in loaded:
            def rerun(m=m):
                inputs64 = to_float64(inputs)
                return float64_copy(model)(*inputs64), float64_copy(m)(*inputs64)

            verdict = agreement(expected, m(*inputs), SAVE_TOL, rerun)
            if not verdict.ok:
                return f"{what}: {verdict.describe(SAVE_TOL)}"
    return None


def load_exported(path) -> nn.Module:
    """Import the standalone code written by :func:`save_exported` and load its weights."""
    init = Path(path) / "__init__.py"
    name = f"dcopt_exported_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, init)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load()
