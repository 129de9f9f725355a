"""Golden values (torchtune style): the quick start shrunk to 16 px, 20 steps, batch 8, CPU, one
thread, seed 0 (tests/golden_values.py RUNS). Its per-step total loss and final metrics are stored
in tests/golden/quickstart.json and must be reproduced within rtol 1e-3 / atol 1e-5 (RTOL, ATOL in
tests/golden_values.py: BLAS and thread-count rounding across machines stays far inside; a changed
loss weight, learning rate, initialisation or data order moves them far outside, which
``test_tolerance_catches_a_changed_loss_weight_and_data_order`` checks).

After an INTENDED change of the numbers, regenerate with one command and commit the JSON:

    python tests/golden_values.py --update
    # or: VTOK_UPDATE_GOLDEN=1 pytest tests/test_golden.py
"""
from __future__ import annotations

import math
import os

import pytest

import golden_values as G


@pytest.mark.parametrize("name", sorted(G.RUNS))
def test_run_reproduces_the_golden_values(name):
    got = G.run(name)
    if os.environ.get("VTOK_UPDATE_GOLDEN"):
        G.write(name, got)
        pytest.skip(f"rewrote {G.path_of(name)}")
    bad = G.differences(G.load(name), got)
    assert not bad, "golden values differ (regenerate with `python tests/golden_values.py --update` " \
                    "if the change is intended):\n" + "\n".join(bad)


@pytest.mark.parametrize("extra,what", [
    ([], None),
    (["losses.0.l1=0.25"], "loss weighting"),  # pixel L1 weight 0.2 -> 0.25
    (["data.train_size=161"], "data order"),  # same images, another permutation: another first batch
])
def test_tolerance_catches_a_changed_loss_weight_and_data_order(extra, what):
    """The first step's loss (before any update: init + first batch + loss weights) with the
    golden config equals the stored one; a changed weight or data order falls outside the tolerance."""
    golden = G.load("quickstart")["loss"][0]
    first = G.run("quickstart", ["train.steps=1", "eval=[]", *extra])["loss"][0]
    close = math.isclose(first, golden, rel_tol=G.RTOL, abs_tol=G.ATOL)
    assert close == (what is None), (what, first, golden)
