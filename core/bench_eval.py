"""``python -m core.bench eval EXP.yaml [--repeat R]``: the evaluation time of an
experiment's first cell, one shared pass (:func:`core.evaluation.run_evaluators`) against one pass
per evaluator (each evaluator's ``evaluate`` running the model on its own, the contract before the
shared pass), in one process on the same model and eval set, one CPU thread. Prints both times and
whether the metrics agree. The model is the cell's as built (untrained, seeded): the time of a pass
does not depend on the weights.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch


def per_evaluator(model, evaluators, loader):
    """The old path: every evaluator runs the eval split through the model itself."""
    from core.evaluation import run_evaluators

    out: dict[str, float] = {}
    for ev in evaluators:
        out.update(run_evaluators(model, [ev], loader))
    return out


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("exp", help="experiment YAML (a sweep: its first cell)")
    p.add_argument("--repeat", type=int, default=2, help="timed repetitions of each path (best is printed)")


def bench_eval(a: argparse.Namespace) -> int:
    from core.bench_cells import first_cell
    from core.cli import positive
    from core.trainer import build, eval_loader, evaluate

    positive(a.repeat, "--repeat")
    torch.set_num_threads(1)
    exp = first_cell(Path(a.exp))
    built = build(exp)
    model = built.model
    loader = eval_loader(built.eval_set, exp.train)
    from contextlib import nullcontext

    one = lambda: evaluate(model, built.evaluators, loader, nullcontext)  # noqa: E731
    old = lambda: per_evaluator(model.eval(), built.evaluators, loader)  # noqa: E731
    with torch.no_grad():
        m_one = one()  # warm-up: caches (the fd reference network), lazy imports
        t_old, t_one = [], []
        for _ in range(a.repeat):
            t = time.perf_counter(); m_old = old(); t_old.append(time.perf_counter() - t)
            t = time.perf_counter(); m_one = one(); t_one.append(time.perf_counter() - t)
    same = all(math.isclose(m_old[k], m_one[k], rel_tol=1e-5, abs_tol=1e-6) for k in m_old) and m_old.keys() == m_one.keys()
    print(f"{exp.name}: {len(built.evaluators)} evaluators ({', '.join(e.type for e in exp.eval)}), "
          f"{len(loader.dataset)} eval images, 1 thread")
    print(f"per-evaluator passes: {min(t_old):.3f} s   one shared pass: {min(t_one):.3f} s   (best of {a.repeat})")
    print(f"metrics equal: {same}")
    print({k: round(v, 4) for k, v in sorted(m_one.items())})
    return 0

