"""The ``dcopt`` command: ``analyze`` (a report to read), ``check`` (a verdict for CI),
``export`` (a trained DynamicModel checkpoint → a plain, smaller model).

A thin layer: targets are loaded by :mod:`dcopt.targets`, the verdict is
:func:`dcopt.testing.check_failures`, the report is :meth:`dcopt.Analysis.render`.
Every error a user can cause is one line on stderr and exit code 2; ``--debug`` adds
the traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import traceback
import warnings
from typing import Any, Optional, Sequence

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_FAIL", "EXIT_ERROR"]

EXIT_OK, EXIT_FAIL, EXIT_ERROR = 0, 1, 2
EXIT_PIPE = 128 + 13   # SIGPIPE: what a tool killed by a closed pipe returns

_TARGET_HELP = """\
TARGET forms:
  path/to/model.py         executed as Python; the model is `model` (a module instance),
                           or build_model() / get_model(), or the class/function named by
                           --model NAME (a class is instantiated with no arguments);
                           example inputs come from example_inputs() in the file, or
                           from --input-shape
  path/to/model.py:NAME    same as --model NAME
  package.module:attr      imported (the current directory is on the path); attr is a
                           module instance or a callable returning one
  torchvision:NAME         torchvision.models.get_model(NAME, weights=None); input
                           1,3,224,224 (1,3,299,299 for inception_v3) unless --input-shape

Security: a TARGET file or module is executed as Python to build the model. Only point
dcopt at code you trust. Checkpoints are read with torch.load(weights_only=True)."""

_MAIN_EPILOG = f"""\
{_TARGET_HELP}

examples:
  dcopt analyze torchvision:resnet18
  dcopt analyze examples/crnn_speech.py
  dcopt analyze models/net.py --model Net --input-shape 8,3,32,32
  dcopt check --strict --min-dynamic 0.5 models/net.py models/speech.py
  dcopt check --format github models/net.py          # annotations in a GitHub Actions log
  dcopt export models/net.py --checkpoint dyn.pt -o exported/

exit codes: 0 ok, 1 a check failed, 2 usage error or the target could not be loaded.
Run 'dcopt COMMAND --help' for the options of each command."""

_ANALYZE_EPILOG = f"""\
The report lists every layer with its role (DCL: its output width is learned; ACL: its
input width follows a learned width; FCL: fixed), the feature groups with their width N
and share of the MACs, every rejection with its reason and file:line, and the totals.

{_TARGET_HELP}

examples:
  dcopt analyze torchvision:resnet18
  dcopt analyze examples/crnn_speech.py
  dcopt analyze my_model.py --model TinyNet --input-shape 1,3,64,64
  dcopt analyze lm.py --input-shape 2,128 --dtype int64     # token ids
  dcopt analyze mypkg.models:build --input-shape 1,16 --input-shape 1,16:bool
  dcopt analyze lm.py --concrete mask=None    # forward(self, ids, mask=None): trace without a mask
  dcopt analyze model.py --json > analysis.json"""

_CHECK_EPILOG = f"""\
exit codes:
  0  every TARGET is convertible (and passes --strict / --min-dynamic when given)
  1  a TARGET is not convertible (no feature group can change width); with --strict,
     a layer was rejected as unsupported; with --min-dynamic F, less than F of the MACs
     can be optimised
  2  usage error, or a TARGET could not be loaded, run or traced

{_TARGET_HELP}

examples:
  dcopt check model.py
  dcopt check --strict --min-dynamic 0.5 models/a.py models/b.py
  dcopt check --json model.py | jq .targets[0].analysis.dynamic_fraction
  dcopt check --format github model.py   # ::error file=F,line=L::message lines"""

_EXPORT_EPILOG = f"""\
The checkpoint is the state of the DynamicModel saved during training:
    dm = dcopt.convert(model, example_inputs)
    ...train...
    torch.save(dm.state_dict(), "dyn.pt")
or the file dcopt.fit(..., checkpoint="dyn.pt") writes. The TARGET must build the
same (untrained) model, so the checkpoint's keys match. The round_to and kappa_min
the state was saved under are used, so the export keeps the widths training kept.
The output folder loads with torch alone (no dcopt needed).

{_TARGET_HELP}

examples:
  dcopt export examples/crnn_speech.py --checkpoint dyn.pt -o exported/
  dcopt export torchvision:resnet18 --checkpoint runs/resnet_dyn.pt -o out/resnet18_small
  dcopt export torchvision:resnet18 -c runs/resnet_dyn.pt -o out/r18_infer --fold-batchnorm"""


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line (like every other dcopt error)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _fraction(text: str) -> float:
    t = text.strip()
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction like 0.5 or 50%, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text!r}")
    return value


def _shape(text: str):
    from .targets import parse_shape
    try:
        return parse_shape(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _dtype(text: str):
    from .targets import parse_dtype
    try:
        return parse_dtype(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _concrete(text: str):
    from .targets import parse_concrete
    try:
        return parse_concrete(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _out_dir(text: str) -> str:
    """``-o ""`` (an unset ``$OUT``) would mean the working directory, where the export
    writes ``__init__.py`` over whatever package is there: a usage error, not a folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty output folder; give the folder to write, e.g. -o exported/")
    return text


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks and warnings")
    load = common.add_argument_group("loading the target")
    load.add_argument("--model", metavar="NAME",
                      help="attribute of a TARGET file that is the model, a class (instantiated with no "
                           "arguments) or a function returning the model")
    load.add_argument("--input-shape", metavar="SHAPE", action="append", type=_shape, dest="input_shapes",
                      help="shape of an example input, e.g. 1,3,224,224; repeat for several inputs; "
                           "a suffix sets that input's dtype (1,16:int64). Overrides example_inputs()")
    load.add_argument("--dtype", type=_dtype, metavar="DTYPE",
                      help="dtype of the --input-shape inputs (default float32; int64 for token ids)")
    load.add_argument("--leaf", metavar="MODULE", action="append", default=[], dest="leaf_modules",
                      help="qualified name of a submodule torch.fx should not trace into; repeatable")
    load.add_argument("--concrete", metavar="NAME=VALUE", action="append", type=_concrete, default=[],
                      dest="concrete",
                      help="fix a forward argument the example inputs do not give, for tracing (torch.fx's "
                           "concrete_args): e.g. mask=None for forward(self, ids, mask=None) with "
                           "`if mask is not None`. VALUE: None, True, False, a number or a quoted string; "
                           "repeatable")

    parser = _Parser(prog="dcopt", formatter_class=fmt, epilog=_MAIN_EPILOG,
                     description="dcopt: find which layer widths of a PyTorch model can be learned, "
                                 "and export the smaller model after training.")
    parser.add_argument("--version", action="version", version=f"dcopt {_version()}")
    parser.add_argument("--debug", action="store_true", default=False, help="show tracebacks and warnings")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("analyze", parents=[common], formatter_class=fmt, epilog=_ANALYZE_EPILOG,
                       help="print a report: layer roles, feature groups, rejections, MACs",
                       description="Analyse TARGET and print a report for the terminal.")
    p.add_argument("target", metavar="TARGET", help="model to analyse (forms below)")
    p.add_argument("--json", action="store_true", help="print Analysis.to_dict() as JSON instead")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("check", parents=[common], formatter_class=fmt, epilog=_CHECK_EPILOG,
                       help="CI gate: exit 0 when every TARGET is convertible, 1 when not, 2 on errors",
                       description="Check that every TARGET can be converted by dcopt (for CI).")
    p.add_argument("targets", metavar="TARGET", nargs="+", help="models to check (forms below)")
    p.add_argument("--strict", action="store_true", help="fail when any layer is rejected as unsupported")
    p.add_argument("--min-dynamic", type=_fraction, default=0.0, metavar="F",
                   help="fail when less than this share of the MACs is optimisable (0.5 or 50%%)")
    p.add_argument("--json", action="store_true", help="print a machine-readable result on stdout")
    p.add_argument("--format", choices=("text", "github"), default="text",
                   help="text (default) or github: ::error file=F,line=L::message annotations")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("export", parents=[common], formatter_class=fmt, epilog=_EXPORT_EPILOG,
                       help="write the plain, smaller model from a trained DynamicModel checkpoint",
                       description="Load a DynamicModel checkpoint and write the exported plain model.")
    p.add_argument("target", metavar="TARGET", help="the model the checkpoint was trained from")
    p.add_argument("--checkpoint", "-c", required=True, metavar="FILE",
                   help="DynamicModel state_dict saved with torch.save(dm.state_dict(), FILE), or the file "
                        "dcopt.fit(..., checkpoint=FILE) writes")
    p.add_argument("-o", "--out", required=True, metavar="DIR", type=_out_dir, help="output folder")
    p.add_argument("--fold-batchnorm", action="store_true",
                   help="for inference: fold each BatchNorm after a convolution or Linear into its weights "
                        "(where exact; faster, but nothing left to fine-tune the BatchNorm with)")
    p.set_defaults(func=cmd_export)
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("dcopt")
    except Exception:
        return "unknown"


# --------------------------------------------------------------------------- plumbing

def _err(message: str) -> None:
    from .targets import one_line
    print(f"dcopt: error: {one_line(message, limit=500)}", file=sys.stderr)


def _load(args, spec: str):
    from .targets import load_target
    return load_target(spec, model_name=args.model, input_shapes=args.input_shapes, dtype=args.dtype,
                       concrete_args=dict(args.concrete))


def _analyze(args, target):
    import dcopt
    with _tracing(target):
        return dcopt.analyze(target.model, target.example_inputs, leaf_modules=tuple(args.leaf_modules),
                             concrete_args=target.concrete_args or None)


@contextlib.contextmanager
def _tracing(target):
    """torch.fx's advice is for the Python API ("pass concrete_args"): say what it is on the
    command line, and name the forward parameters fx traced as inputs because the example
    inputs left them unfilled (``mask=None`` then reads as a tensor, and the forward fails
    on a None it never saw while tracing)."""
    from .errors import TraceError
    from .targets import TargetError, concrete_literal, unfilled_parameters
    try:
        yield
    except TraceError as exc:
        free = unfilled_parameters(target)
        if free:
            one = len(free) == 1
            given = ", ".join(f"{p.name}={p.default!r}" for p in free)
            usable = [p for p in free if concrete_literal(p.default)]
            option = shlex.quote(f"{usable[0].name}={usable[0].default!r}") if usable else "NAME=VALUE"
            # first: fx's own message runs long, and the line is capped
            raise TargetError(
                f"forward's {'parameter' if one else 'parameters'} {given} got no value from the example "
                f"inputs, so torch.fx traced {'it' if one else 'them'} as {'an input' if one else 'inputs'}, "
                f"not as the default; if the forward branches on {'it' if one else 'one'}, pass --concrete "
                f"{option} (repeatable) to trace it with that value. The trace failed with: {exc}") from exc
        if "concrete_args" not in str(exc):
            raise
        raise TargetError(f"{exc} (on the command line, concrete_args are given with --concrete NAME=VALUE)") from exc


def _describe_error(exc: BaseException, spec: Optional[str] = None) -> str:
    """One line for any exception: ours verbatim, anything else as an internal error."""
    from .errors import DcoptError
    from .targets import TargetError, one_line
    text = one_line(exc, limit=500)
    if isinstance(exc, TargetError):
        msg = text
    elif isinstance(exc, DcoptError):
        msg = text or type(exc).__name__
    else:
        msg = (f"internal error ({type(exc).__name__}: {text}); please report it with the output "
               f"of --debug")
    if spec and spec not in msg:
        msg = f"{spec}: {msg}"
    return msg


def _console():
    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            # rich exits with status 1 here, which reads as "not convertible"; main()
            # turns the closed pipe into its own exit status
            self.quiet = True
            raise BrokenPipeError

    if not sys.stdout.isatty() and "COLUMNS" not in os.environ:
        return _Console(width=120)
    return _Console()


def _human(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:,.0f}"


def _relpath(loc: Optional[str]) -> Optional[str]:
    if not loc:
        return loc
    path, sep, line = loc.rpartition(":")
    if not sep or not line.isdigit():
        path, line = loc, ""
    try:
        rel = os.path.relpath(path)
        if not rel.startswith(".."):
            path = rel
    except ValueError:
        pass
    return f"{path}:{line}" if line else path


# --------------------------------------------------------------------------- commands

def cmd_analyze(args) -> int:
    from .targets import isolated_imports
    with isolated_imports():   # a process may run several commands (tests, a notebook)
        target = _load(args, args.target)
        analysis = _analyze(args, target)
    if args.json:
        print(json.dumps(analysis.to_dict(), indent=2, default=str))
        return EXIT_OK
    from rich.rule import Rule
    from rich.text import Text
    console = _console()
    console.print(Rule(Text(f"dcopt analyze {target.source}", style="bold")))
    console.print(Text(f"example inputs: {_inputs(target)}", style="dim"))
    console.print(analysis.render())
    console.print(_verdict(analysis))
    return EXIT_OK


def _inputs(target) -> str:
    from .targets import describe_inputs
    return describe_inputs(target.example_inputs)


def _verdict(analysis):
    """The one line a person looks for; the totals are in the report itself."""
    from rich.text import Text
    n_unsup = len(analysis.unsupported)
    t = Text()
    if analysis.convertible:
        t.append("convertible", style="bold green")
    else:
        t.append("not convertible", style="bold red")
        t.append(": no feature group can change width")
    if n_unsup:
        t.append(f" ({n_unsup} layer{'s' if n_unsup != 1 else ''} rejected as unsupported; "
                 f"'dcopt check --strict' fails)", style="yellow")
    return t


def cmd_check(args) -> int:
    from .targets import isolated_imports
    from .testing import check_failures, format_rejection
    results: list[dict[str, Any]] = []
    quiet = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    for spec in args.targets:
        try:
            # each target as in a process of its own: a neighbour module one file imported
            # (`from layers import Block`) must not stand in for another's of the same name
            with quiet, isolated_imports():
                target = _load(args, spec)
                analysis = _analyze(args, target)
        except Exception as exc:
            if args.debug:
                traceback.print_exc()
            msg = _describe_error(exc, spec)
            _err(msg)
            results.append(dict(target=spec, ok=False, error=msg, path=_file_of(spec)))
            continue
        failures = check_failures(analysis, strict=args.strict, min_dynamic=args.min_dynamic)
        results.append(dict(target=spec, source=target.source, path=target.path, ok=not failures,
                            failures=failures, analysis=analysis))

    code = EXIT_ERROR if any("error" in r for r in results) else (
        EXIT_FAIL if any(not r["ok"] for r in results) else EXIT_OK)
    if args.json:
        out = dict(ok=code == EXIT_OK, exit_code=code, strict=args.strict, min_dynamic=args.min_dynamic,
                   targets=[_json_result(r) for r in results])
        print(json.dumps(out, indent=2, default=str))
    elif args.format == "github":
        for r in results:
            _github(r, args.strict)
        _summary(results)
    else:
        for r in results:
            if "error" in r:
                print(f"ERROR {r['target']}")
                continue
            a = r["analysis"]
            head = "PASS" if r["ok"] else "FAIL"
            n_dyn = sum(g.status == "dynamic" for g in a.groups)
            print(f"{head} {r['target']}: {n_dyn} dynamic group(s), {a.dynamic_fraction:.1%} of "
                  f"{a.macs:,} MACs optimisable")
            for f in r["failures"]:
                print(f"  {f}")
            for rej in a.unsupported:
                print(f"  {'error' if args.strict else 'note'}: {format_rejection(_rel_rejection(rej))}")
        _summary(results)
    return code


def _summary(results) -> None:
    n_fail = sum(not r["ok"] for r in results)
    if len(results) > 1 or n_fail:
        print(f"dcopt check: {len(results) - n_fail} of {len(results)} target(s) passed")


def _rel_rejection(rej):
    import copy
    r = copy.copy(rej)
    try:
        r.location = _relpath(rej.location)
    except Exception:
        return rej
    return r


def _file_of(spec: str) -> Optional[str]:
    path = spec.rsplit(":", 1)[0] if ".py:" in spec else spec
    return path if path.endswith(".py") and os.path.isfile(path) else None


def _json_result(r: dict) -> dict:
    if "error" in r:
        return dict(target=r["target"], ok=False, error=r["error"])
    return dict(target=r["target"], source=r["source"], ok=r["ok"], failures=r["failures"],
                analysis=r["analysis"].to_dict())


def _gh_escape(text: str, prop: bool = False) -> str:
    s = str(text).replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    if prop:
        s = s.replace(":", "%3A").replace(",", "%2C")
    return s


def _gh(level: str, message: str, location: Optional[str] = None, title: str = "dcopt") -> None:
    props = []
    if location:
        path, sep, line = location.rpartition(":")
        if sep and line.isdigit():
            props += [f"file={_gh_escape(path, True)}", f"line={line}"]
        else:
            props.append(f"file={_gh_escape(location, True)}")
    props.append(f"title={_gh_escape(title, True)}")
    print(f"::{level} {','.join(props)}::{_gh_escape(message)}")


def _github(r: dict, strict: bool) -> None:
    if "error" in r:
        _gh("error", r["error"], r.get("path"), title=f"dcopt: cannot load {r['target']}")
        return
    a = r["analysis"]
    for f in r["failures"]:
        _gh("error", f"{r['source']}: {f}", r.get("path"), title="dcopt check")
    level = "error" if strict else "warning"
    for rej in a.unsupported:
        op = rej.op or rej.node
        _gh(level, f"{op}: {rej.reason}", _relpath(rej.location) or r.get("path"),
            title=f"dcopt: {op} keeps its width")


def cmd_export(args) -> int:
    from .targets import isolated_imports
    with isolated_imports():   # the model's module stays registered until it is saved
        return _export(args)


def _export(args) -> int:
    import torch

    import dcopt
    from .targets import TargetError
    if not os.path.isfile(args.checkpoint):
        raise TargetError(f"checkpoint not found: {args.checkpoint}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise TargetError(f"-o {args.out} is a file; the exported model is written as a folder")
    blocker = _file_above(args.out)
    if blocker:   # before the minutes of loading and converting that would end at makedirs
        raise TargetError(f"-o {args.out}: {blocker} is a file, so no folder can be made below it")
    target = _load(args, args.target)
    kwargs = dict(leaf_modules=tuple(args.leaf_modules)) if args.leaf_modules else {}
    if target.concrete_args:
        kwargs["concrete_args"] = target.concrete_args
    try:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TargetError(f"cannot read checkpoint {args.checkpoint} with torch.load(weights_only=True): "
                          f"{type(exc).__name__}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    from .checkpoint import FORMAT
    if isinstance(state, dict) and state.get("format") == FORMAT:  # fit(..., checkpoint=FILE)
        state = state["model"]
    if not isinstance(state, dict):
        raise TargetError(f"checkpoint {args.checkpoint} holds a {type(state).__name__}; expected a "
                          f"state_dict saved with torch.save(dm.state_dict(), path)")
    # the kept sizes depend on round_to and kappa_min: convert with the ones the state was
    # saved under (recorded in its extra state), so the export keeps the widths it kept
    extra = state.get("_extra_state")
    if isinstance(extra, dict):
        kwargs.update({k: extra[k] for k in dcopt.DynamicModel.SIZING_OPTIONS if k in extra})
    with _tracing(target):
        dm = dcopt.convert(target.model, target.example_inputs, **kwargs)
    try:
        dm.load_state_dict(state)
    except RuntimeError as exc:
        raise TargetError(f"checkpoint {args.checkpoint} does not match the DynamicModel of "
                          f"{target.source}: {exc}") from exc
    dm.eval()
    plain = dcopt.export(dm, fold_batchnorm=args.fold_batchnorm)
    try:
        dcopt.save_exported(plain, args.out, example_inputs=target.example_inputs)
    except OSError as exc:
        if exc.filename is None:   # not a file the OS refused (inspect's "could not get source")
            raise
        # the folder cannot be made or written (no such parent, no permission, disk full,
        # a name too long): the user's path, not a dcopt fault
        raise TargetError(f"cannot write the exported model to -o {args.out}: {exc.strerror or exc} "
                          f"({exc.filename})") from exc

    before_p = sum(p.numel() for p in target.model.parameters())
    after_p = sum(p.numel() for p in plain.parameters())
    before_m = _macs(target.model, target.example_inputs, target.concrete_args)
    after_m = _macs(plain, target.example_inputs)
    print(f"exported {target.source} -> {args.out}")
    print(f"  params {before_p:,} -> {after_p:,} ({_ratio(after_p, before_p)})")
    if before_m is not None and after_m is not None:
        print(f"  MACs   {before_m:,} -> {after_m:,} ({_ratio(after_m, before_m)})")
    if args.fold_batchnorm:
        from torch.nn.modules.batchnorm import _BatchNorm
        n_bn = sum(isinstance(m, _BatchNorm) for m in target.model.modules())
        left = sum(isinstance(m, _BatchNorm) for m in plain.modules())
        print(f"  BatchNorm folded into the layer before it: {n_bn - left} of {n_bn}"
              + (" (the others cannot be folded exactly)" if left else ""))
    files = sorted(os.listdir(args.out)) if os.path.isdir(args.out) else []
    if files:
        print(f"  files: {', '.join(files)}")
    return EXIT_OK


def _file_above(path: str) -> Optional[str]:
    """The nearest existing ancestor of ``path`` when it is not a folder (``-o model.pt/sub``)."""
    parent = os.path.dirname(os.path.normpath(path)) or os.curdir
    while not os.path.exists(parent):
        up = os.path.dirname(parent) or os.curdir
        if up == parent:
            return None
        parent = up
    return None if os.path.isdir(parent) else parent


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.1%}" if b else "n/a"


def _macs(model, inputs, concrete_args: Optional[dict] = None) -> Optional[int]:
    """MACs as dcopt counts them (FlopCounterMode / 2, LSTMs by formula); None if unknown."""
    import dcopt
    try:
        return int(dcopt.analyze(model, inputs, concrete_args=concrete_args or None).macs)
    except Exception:
        return None


# --------------------------------------------------------------------------- entry

def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        _err("choose a command: analyze, check or export (see 'dcopt --help')")
        return EXIT_ERROR
    with warnings.catch_warnings():
        if not args.debug:
            warnings.simplefilter("ignore")
        try:
            code = args.func(args)
            sys.stdout.flush()   # a closed pipe shows here, not at interpreter exit
            return code
        except BrokenPipeError:
            # the reader stopped early (``| head``): not a dcopt failure; silence the
            # interpreter's own flush at exit and end as a SIGPIPE-killed tool does
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_PIPE
        except KeyboardInterrupt:
            _err("interrupted")
            return 130
        except Exception as exc:
            if args.debug:
                traceback.print_exc()
            _err(_describe_error(exc))
            return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
