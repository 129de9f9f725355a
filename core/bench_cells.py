"""``python -m core.bench cells [EXP.yaml ...]``: training throughput of each experiment's first cell,
the first round's step against today's, side by side in one process.

For every experiment (default: every sweep in ``experiments/`` with a ``paper`` section) the first
grid cell is built once per variant from the same config and seed, and ``--steps`` generator steps
(data loading, forward, every loss, backward, optimizer) are timed, alternating the variants
``--repeats`` times so load changes hit both:

- ``before``: AdamW's per-tensor loop (torch's default on CPU before ``OptimizerConfig.build``) and
  the ``shapes`` items rendered on every draw (no cache);
- ``after``: what the trainer runs now: torch's fused AdamW, the shapes item cache.

The first ``--warmup`` steps of each variant are not timed (lazy imports, allocator warm-up; the
cache fills during them only as much as a real run's first steps fill it: a 20,000-item split is
not pre-rendered, so ``after`` includes the renders of its first draws). Images/s are the median
over repeats; one CPU thread per cell (``--threads``), as a sweep worker runs.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiments", nargs="*", help="experiment YAML files (default: every paper sweep in experiments/)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per repeat and variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before each timed block")
    p.add_argument("--repeats", type=int, default=3, help="alternating before/after blocks")
    p.add_argument("--threads", type=int, default=1, help="torch threads (a sweep worker's share)")


def paper_sweeps() -> list[Path]:
    from core.config import read_yaml

    return [p for p in sorted(EXPERIMENTS.glob("*.yaml")) if {"sweep", "paper"} <= set(read_yaml(p) or {})]


def first_cell(path: Path) -> Any:
    from core.config import read_yaml, validate
    from core.sweep.space import grid_points, parse_sweep, validate_cell

    raw = read_yaml(path)
    if not raw.get("sweep"):
        return validate(raw)
    sw = parse_sweep(raw["sweep"])
    if sw.sampler == "grid":
        return validate_cell(raw, sw, grid_points(sw)[0], sw.seeds[0])
    raw = {k: v for k, v in raw.items() if k not in ("sweep", "paper")}
    return validate(raw)


class _Variant:
    """One variant's model, optimizer and data stream, stepped on demand."""

    def __init__(self, exp: Any, before: bool) -> None:
        from core.trainer import TrainStep, build, param_groups, train_loader

        built = build(exp)
        if before and hasattr(built.train_set, "_cache"):
            built.train_set._cache = None
        self.step_module = TrainStep(built.model, built.losses, built.labels).train()
        o = exp.train.optimizer
        groups = param_groups([built.model, built.losses], set(), o.weight_decay)
        self.opt = (torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, foreach=False) if before
                    else o.build(groups))
        self.data = train_loader(built.train_set, exp.train, exp.seed, 0)
        self.batch_size, self.step = exp.train.batch_size, 0

    def run(self, n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            batch = next(self.data)
            total, _, _ = self.step_module(batch, self.step)
            self.opt.zero_grad(set_to_none=True)
            total.backward()
            self.opt.step()
            self.step += 1
        return time.perf_counter() - t


def bench_cell(exp: Any, args: argparse.Namespace) -> dict[str, float]:
    variants = {"before": _Variant(exp, True), "after": _Variant(exp, False)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for v in variants.values():
        v.run(args.warmup)
    for _ in range(args.repeats):
        for name, v in variants.items():
            times[name].append(v.run(args.steps))
    ips = {name: args.steps * variants[name].batch_size / statistics.median(t) for name, t in times.items()}
    return {"before": ips["before"], "after": ips["after"], "ratio": ips["after"] / ips["before"]}


def bench_cells(args: argparse.Namespace) -> int:
    from core.cli import positive
    from core.errors import ConfigError

    for opt in ("steps", "repeats", "threads"):
        positive(getattr(args, opt), f"--{opt}")
    positive(args.warmup, "--warmup", allow_zero=True)
    paths = [Path(p) for p in args.experiments] or paper_sweeps()
    for p in paths:
        if not p.is_file():
            raise ConfigError(str(p), "experiment file not found")
    torch.set_num_threads(args.threads)
    print(f"training images/s of each experiment's first cell, {args.threads} thread(s), median of {args.repeats} "
          f"alternating blocks of {args.steps} steps (before: AdamW per-tensor loop, shapes rendered per draw; "
          "after: fused AdamW, shapes item cache)")
    print(f"{'experiment':<22} {'batch':>5} {'before':>9} {'after':>9} {'ratio':>6}")
    for p in paths:
        try:
            exp = first_cell(p)
            r = bench_cell(exp, args)
        except ConfigError as e:  # e.g. a UniWeTok file before its CLIP teacher was trained
            print(f"{p.stem:<22} skipped: {e}", flush=True)
            continue
        print(f"{p.stem:<22} {exp.train.batch_size:>5} {r['before']:>9.1f} {r['after']:>9.1f} {r['ratio']:>6.2f}", flush=True)
    return 0
