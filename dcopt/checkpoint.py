"""Resumable :func:`dcopt.fit`: what a finished epoch leaves behind, on disk.

Why: a fit over tens of epochs that dies in epoch 37 (pre-emption, Ctrl-C, a full disk)
should not cost the 36 before it. ``fit(..., checkpoint=path)`` writes this file after
every epoch and, when the file already exists, continues after the last epoch it holds.
It holds everything the next epoch reads:

* the DynamicModel's ``state_dict`` (weights, κ, β, phase);
* the optimizer's ``state_dict`` (Adam's moments, the learning rates: the settle lr, a
  size lr held at 0 while tolerance mode recovers);
* the :class:`~dcopt.train.History` so far;
* tolerance mode's controller, its training-loss average and the sizes it would fall
  back to;
* the random number generators (the feature noise, and the seed a shuffling
  ``DataLoader`` draws from torch's generator at every epoch);
* each gated RNN's cached output σ (the recurrent noise's scale).

So, with the same data in the same order (a list, or a ``DataLoader`` whose shuffling
draws from torch's generator, with ``num_workers=0``), the resumed run computes what
the uninterrupted run would have, bit for bit (tests/test_checkpoint.py).

The file holds tensors, numbers, strings, lists and dicts only, and is read with
``torch.load(..., weights_only=True)``: loading a checkpoint executes no code (DESIGN.md,
invariant 7). It is written to a temporary name and renamed, so a crash while writing
leaves the previous epoch's file intact.
"""
from __future__ import annotations

import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Optional, Union

import torch

__all__ = ["save_fit_state", "load_fit_state", "FORMAT"]

FORMAT = "dcopt-fit-checkpoint/1"


def save_fit_state(path: Union[str, os.PathLike], *, dm, opt, history, schedule: tuple, epoch: int, step: int,
                   controller=None, ema=None, last_ok=None) -> None:
    """Write the state after ``epoch`` (counted over the whole run) to ``path``."""
    state = {
        "format": FORMAT,
        "schedule": list(schedule),
        "groups": list(dm.group_names),
        "epoch": int(epoch),
        "step": int(step),
        "model": dm.state_dict(),
        "optimizer": opt.state_dict(),
        "history": history.to_dict(),
        "controller": _controller_state(controller),
        "ema": None if ema is None else {"decay": ema.decay, "avg": ema._avg, "weight": ema._weight},
        "last_ok": None if last_ok is None else [k.detach().clone() for k in last_ok],
        "rng": {"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized()
                else []},
        "rnn_sigmas": _rnn_sigmas(dm),
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_fit_state(path: Union[str, os.PathLike], *, dm, schedule: tuple) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_fit_state` and check it belongs to this
    run: same groups, same schedule. Raises ``ValueError`` saying what differs."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a dcopt fit checkpoint ({FORMAT}); pass another checkpoint path or "
                         "delete the file to start afresh")
    if state["groups"] != list(dm.group_names):
        raise ValueError(f"checkpoint {path} was written for groups {state['groups']}, this model has "
                         f"{list(dm.group_names)}: it belongs to another model")
    if state["schedule"] != list(schedule):
        raise ValueError(f"checkpoint {path} was written for (fixed, optimize, settle) epochs = "
                         f"{tuple(state['schedule'])}, this call asks for {tuple(schedule)}: resume with the same "
                         "schedule, or delete the file to start afresh")
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["rng"]["cpu"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def restore_rnn_sigmas(dm, sigmas: dict) -> None:
    for name, sig in sigmas.items():
        module = dm.get_submodule(name)
        module._sigmas.clear()
        module._sigmas.update({k: (dict(v) if isinstance(v, dict) else v) for k, v in sig.items()})


def _rnn_sigmas(dm) -> dict:
    from .gates import GatedRNN

    return {name: {k: (dict(v) if isinstance(v, dict) else v.clone()) for k, v in m._sigmas.items()}
            for name, m in dm.named_modules() if isinstance(m, GatedRNN) and m._sigmas}


def _controller_state(controller) -> Optional[dict]:
    if controller is None:
        return None
    out = {f.name: getattr(controller, f.name) for f in fields(controller) if f.name != "steps"}
    out["beta_range"] = list(out["beta_range"])
    out["steps"] = [asdict(s) for s in controller.steps]
    return out


def restore_controller(controller, state: Optional[dict]) -> None:
    """Put a ToleranceController back where the checkpoint left it (its settings come from
    this call, so a user who changes e.g. ``rate`` on resume gets the new one)."""
    from .tolerance import ToleranceStep

    if controller is None or state is None or (state["reference"] is None and not state["steps"]):
        return  # written before the optimize phase: the controller has not started yet
    for name in ("reference", "beta", "calibrated", "_recent", "_feasible_beta", "_recovering", "_growth",
                 "_violated"):
        setattr(controller, name, state[name])
    controller.steps = [ToleranceStep(**s) for s in state["steps"]]


def restore_ema(ema, state: Optional[dict]) -> None:
    if ema is None or state is None:
        return
    ema.decay, ema._avg, ema._weight = state["decay"], state["avg"], state["weight"]
