"""Fuzzing the graph machinery with random architectures (tests/fuzz_models.py).

Each seed is one model; a problem (a difference between the export and the gated model
on any input, full width differing from the user's model, MACs or parameters not as
predicted, a crash, a mutated user model) fails the test, a rejection does not.
``DCOPT_FUZZ_CASES`` sets how many seeds (default 40, about half a minute); thousands
run by hand (``DCOPT_FUZZ_CASES=3000``, the kappa_min=0.01 half included) before a
change to a rule lands."""
from __future__ import annotations

import os
import warnings

import pytest

import fuzz_models

CASES = int(os.environ.get("DCOPT_FUZZ_CASES", "40"))

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("seed", range(CASES))
def test_random_architecture_exports_exactly(seed):
    kmin = 0.01 if seed % 2 else None   # half at a floor that lets groups shrink to one feature
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        status, tags, problems = fuzz_models.check_case(seed, kmin)
    real = [p for p in problems if not p.startswith("info")]
    assert not real and not status.startswith("CRASH"), (status, tags, real)
