"""Resumable :func:`dcopt.fit`: what a finished epoch leaves behind, on disk.

Why: a fit over tens of epochs that dies in epoch 37 (pre-emption, Ctrl-C, a full disk)
should not cost the 36 before it. ``fit(..., checkpoint=path)`` writes this file after
every epoch and, when the file already exists, continues after the last epoch it holds.
It holds everything the next epoch reads:

* the DynamicModel's ``state_dict`` (weights, κ, β, phase, round_to and kappa_min);
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
from pathlib import Path
from typing import Any, Union

import torch

__all__ = ["save_fit_state", "load_fit_state", "restore_fit_state", "FORMAT"]

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
        "controller": None if controller is None else controller.state_dict(),
        "ema": None if ema is None else ema.state_dict(),
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


def restore_fit_state(state: dict, *, dm, opt, controller=None, ema=None, path="") -> None:
    """Put the model, the optimizer, tolerance mode's controller and loss average, each gated
    RNN's noise scale and the random generators back where ``state`` (from
    :func:`load_fit_state`) left them. The controller keeps this call's settings (a user who
    changes e.g. its ``rate`` on resume gets the new one)."""
    dm.load_state_dict(state["model"])
    try:
        opt.load_state_dict(state["optimizer"])
    except ValueError as e:
        raise ValueError(f"checkpoint {path}: its optimizer state does not fit this call's optimizer ({e}); "
                         "resume with the same optimizer, or delete the file to start afresh") from e
    if controller is not None and state["controller"] is not None:
        controller.load_state_dict(state["controller"])
    if ema is not None and state["ema"] is not None:
        ema.load_state_dict(state["ema"])
    for name, noise in state["rnn_sigmas"].items():
        dm.get_submodule(name).load_noise_state(noise)
    torch.set_rng_state(state["rng"]["cpu"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def _rnn_sigmas(dm) -> dict:
    from .gates import GatedRNN

    states = {name: m.noise_state() for name, m in dm.named_modules() if isinstance(m, GatedRNN)}
    return {name: st for name, st in states.items() if st["std"]}
