"""Golden values (torchtune style): tiny seeded runs whose per-step total loss and final metrics are
stored in tests/golden/<name>.json and compared by tests/test_golden.py.

Regenerate after an intended change of the numbers (a new initialisation, loss weighting, data order):

    python tests/golden_values.py --update             # rewrites every tests/golden/*.json
    VTOK_UPDATE_GOLDEN=1 pytest tests/test_golden.py   # the same from the test
    python tests/golden_values.py                      # compare only; prints the differences

and commit the JSON files with the change that moved them (say why in the message).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "tests" / "golden"

#: relative / absolute tolerance of every stored number. Loose enough for BLAS / thread-count
#: summation-order differences across machines (float32 rounding, ~1e-6 relative per op, grows
#: over 20 Adam steps to ~1e-5); tight enough that a changed loss weight, learning rate, init or
#: data order moves the per-step loss by far more (>= 1e-2 relative at some step; see
#: tests/test_golden.py::test_tolerance_catches_a_changed_loss_weight_and_data_order).
RTOL, ATOL = 1e-3, 1e-5

#: name -> (experiment file, overrides): tiny sizes, 20 steps, CPU, logging every step
RUNS: dict[str, tuple[str, list[str]]] = {
    "quickstart": ("experiments/quickstart.yaml", [
        "data.image_size=16", "data.train_size=160", "train.steps=20", "train.batch_size=8", "train.log_every=1",
        "train.eval_size=32", "train.eval_batch_size=16", "train.eval_every=0", "train.ckpt_every=0",
        "train.progress=false", "train.device=cpu", "tracking.enabled=false"]),
}


class _Recorder:
    """Stands in for the tracker: keeps every logged row by step (tracking itself stays off)."""

    def __init__(self) -> None:
        self.rows: dict[int, dict[str, float]] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> "_Recorder":
        return self

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.rows.setdefault(step, {}).update(metrics)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(name: str, extra: list[str] | None = None) -> dict[str, Any]:
    """Train the golden run ``name`` (with optional extra overrides) in a temporary directory;
    -> {"loss": [total loss per step], "metrics": {final metrics}}."""
    from core import trainer
    from core.config import apply_overrides, read_yaml, validate

    path, over = RUNS[name]
    with tempfile.TemporaryDirectory() as tmp, _one_thread():
        raw = apply_overrides(read_yaml(ROOT / path), [*over, f"train.out_dir={tmp}", *(extra or [])])
        rec = _Recorder()
        with mock.patch.object(trainer, "make_tracker", rec):
            result = trainer.train(validate(raw))
    steps = sorted(rec.rows)
    assert steps == list(range(1, len(steps) + 1)), steps
    return {"loss": [rec.rows[s]["loss/total"] for s in steps],
            "metrics": {k: float(v) for k, v in sorted(result.metrics.items())}}


def path_of(name: str) -> Path:
    return HERE / f"{name}.json"


def load(name: str) -> dict[str, Any]:
    return json.loads(path_of(name).read_text())


def write(name: str, values: dict[str, Any]) -> Path:
    out = path_of(name)
    out.write_text(json.dumps({"experiment": RUNS[name][0], "overrides": RUNS[name][1], "rtol": RTOL, "atol": ATOL, **values},
                              indent=1) + "\n")
    return out


def differences(expected: dict[str, Any], got: dict[str, Any]) -> list[str]:
    """Every stored number outside the tolerance (or missing), as readable lines; [] when all match."""
    bad = []
    if len(got["loss"]) != len(expected["loss"]):
        bad.append(f"steps: {len(got['loss'])} != {len(expected['loss'])}")
    for i, (a, b) in enumerate(zip(got["loss"], expected["loss"])):
        if not math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL):
            bad.append(f"loss at step {i + 1}: {a:.6g} != golden {b:.6g}")
    for k, b in expected["metrics"].items():
        a = got["metrics"].get(k)
        if a is None or not math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL):
            bad.append(f"metric {k}: {a} != golden {b:.6g}")
    return bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python tests/golden_values.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--update", action="store_true", help="rewrite tests/golden/<name>.json from a fresh run")
    p.add_argument("names", nargs="*", help=f"runs (default: all of {', '.join(RUNS)})")
    args = p.parse_args(argv)
    status = 0
    for name in args.names or list(RUNS):
        got = run(name)
        if args.update:
            print(f"wrote {write(name, got)}")
            continue
        bad = differences(load(name), got)
        print(f"{name}: " + ("matches" if not bad else "\n  ".join(["differs:", *bad])))
        status |= bool(bad)
    return status


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
