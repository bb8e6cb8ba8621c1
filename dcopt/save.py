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


def _constructor(module: nn.Module) -> Optional[str]:
    """A ``torch.nn.X(...)`` expression that rebuilds ``module`` (checked), or None."""
    cls = type(module)
    if not cls.__module__.startswith("torch.nn") or getattr(nn, cls.__name__, None) is not cls:
        return None
    text = repr(module)
    if "\n" in text:
        return None
    expr = f"torch.nn.{text}"
    try:
        rebuilt = eval(expr, {"torch": torch, "inf": float("inf")})
    except Exception:
        return None
    same = repr(rebuilt) == text and {k: v.shape for k, v in rebuilt.state_dict().items()} == \
        {k: v.shape for k, v in module.state_dict().items()}
    return expr if same else None


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
    """The model with its trained weights (read with weights_only=True)."""
    model = {name}()
    state = torch.load(os.path.join(os.path.dirname(__file__), "weights.pt"), map_location=map_location,
                       weights_only=True)
    model.load_state_dict(state)
    return model.eval()
'''


def _python_source(model: nn.Module, class_name: str) -> tuple[str, dict]:
    """Standalone source for ``model`` and the state dict it loads; raises ExportError."""
    try:
        gm = _as_graph_module(model)
    except Exception as exc:
        raise ExportError(f"cannot write standalone code: fx cannot trace the exported model ({exc})") from exc
    body = []
    targets = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for qual in sorted(targets):
        expr = _constructor(gm.get_submodule(qual))
        if expr is None:
            raise ExportError(f"cannot write standalone code for module '{qual}' "
                              f"({type(gm.get_submodule(qual)).__name__}): not a plain torch.nn layer")
        body.append(f"        _place(self, {qual!r}, {expr})")
    for qual, t in list(gm.named_parameters()) + list(gm.named_buffers()):
        if qual.rpartition(".")[0] in targets:
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
        if qual.rpartition(".")[0] not in targets and qual not in state:
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
    fails is removed, not left to be loaded. Files of an earlier save into the same folder
    (``model.pt2``, ``__init__.py``, ``weights.pt``, ``WHY.txt``) are replaced or removed
    first, so the folder never mixes two models. ``model``'s train/eval flags are restored.

    Example::

        dcopt.save_exported(small, "out/small", example_inputs=(x,))
    """
    folder = Path(path)
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


def _write(model: nn.Module, folder: Path, example_inputs: Optional[tuple], class_name: str, check: bool) -> None:
    notes = []
    program_ok = False
    if example_inputs is not None:
        try:
            with warnings.catch_warnings():
                # torch's own note on every RNN (it re-assigns _flat_weights while exporting):
                # harmless, and the saved program is checked against the model below
                warnings.filterwarnings("ignore", message=r".*_flat_weights.*were assigned during export")
                program = torch.export.export(model, example_inputs)
            torch.export.save(program, folder / "model.pt2")
            program_ok = True
        except Exception as exc:  # some models cannot be torch.export-ed
            notes.append(f"model.pt2 not written: torch.export failed: {type(exc).__name__}: {exc}")
    try:
        text, state = _python_source(model, class_name)
        (folder / "__init__.py").write_text(text)
        torch.save(state, folder / "weights.pt")
        python_ok = True
    except ExportError as exc:
        notes.append(f"__init__.py not written: {exc}")
        python_ok = False
    if notes:
        (folder / "WHY.txt").write_text("\n".join(notes) + "\n")
    if not (python_ok or program_ok):
        raise ExportError("could not save the model in a form that loads without dcopt: " + "; ".join(notes))
    if check and example_inputs is not None:
        try:
            failure = _check_saved(model, folder, example_inputs, python_ok, program_ok)
        except Exception as exc:  # noqa: BLE001 - what was written does not even load back
            failure = f"loading it back failed: {type(exc).__name__}: {exc}"
        if failure is not None:
            # a saved model that does not reproduce the model must not stay where it would be loaded
            for name in _WRITTEN:
                (folder / name).unlink(missing_ok=True)
            (folder / "WHY.txt").write_text(f"nothing kept: {failure}\n")
            raise ExportError(f"the saved model at {folder} does not reproduce the model ({failure}); "
                              "the files were removed. Please report this model: it is a dcopt bug")


def _check_saved(model: nn.Module, folder: Path, inputs: tuple, python_ok: bool, program_ok: bool) -> Optional[str]:
    """Load what was written and compare it with ``model`` on ``inputs``; a reason, or None.

    The saved forms run the same ops as the model, so their float32 results should agree
    to rounding; a rounding-noise output (e.g. the mean of a normalised tensor) still gets
    numcheck's float64 second opinion before it is called a fault."""
    from .numcheck import agreement, float64_copy, to_float64

    loaded = []
    if python_ok:
        loaded.append(("__init__.py", load_exported(folder)))
    if program_ok:
        loaded.append(("model.pt2", torch.export.load(folder / "model.pt2").module()))
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
