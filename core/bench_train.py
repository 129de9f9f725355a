"""``python -m core.bench train``: the full trainer against a hand-written minimal loop.

Both train the same modules (built from the same config and seed) on the same batches with the
same optimizer, scheduler and clipping, in one process, alternating A/B ``--repeats`` times so
that load changes hit both. The full trainer runs with MLflow tracking on (a throw-away SQLite
store, buffered metrics) and its progress bar off; its time is the step loop measured by the
trainer itself (``RunResult.train_seconds``: final checkpoint and evaluation excluded, periodic
logging included). Then one profiled pass splits a step into data loading, forward (of which the
quantizer), loss terms, backward and optimizer.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

QUICKSTART = Path(__file__).resolve().parent.parent / "experiments" / "quickstart.yaml"


def _experiment(args: argparse.Namespace, out_dir: str, tracking: bool) -> Any:
    from core.config import load_experiment

    over = [f"train.steps={args.steps}", f"train.out_dir={out_dir}", "train.progress=false", "train.eval_size=16",
            "train.eval_every=0", "train.ckpt_every=0", f"tracking.enabled={str(tracking).lower()}", *args.overrides]
    return load_experiment(args.experiment, over)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def minimal_loop(exp: Any, profile: bool = False) -> tuple[float, dict[str, float]]:
    """The loop a researcher would write by hand over the same modules, data and optimizer."""
    from core.trainer import build, lr_factor, param_groups, pick_device, train_loader

    cfg = exp.train
    built = build(exp)
    device = pick_device(cfg.device)
    model, losses = built.model.to(device), built.losses.to(device)
    o = cfg.optimizer
    opt = o.build(param_groups([model, losses], set(), o.weight_decay))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    data = train_loader(built.train_set, cfg, exp.seed, 0)
    params = [p for g in opt.param_groups for p in g["params"]]
    parts = dict.fromkeys(["data", "forward", "quantizer", "loss terms", "backward", "optimizer"], 0.0)
    q_time = [0.0]
    if profile:  # forward hooks time the quantizer inside the forward pass
        t_q = [0.0]
        model.quantizer.register_forward_pre_hook(lambda *a: t_q.__setitem__(0, time.perf_counter()))
        model.quantizer.register_forward_hook(lambda *a: q_time.__setitem__(0, q_time[0] + time.perf_counter() - t_q[0]))
    model.train()
    start = time.perf_counter()
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in next(data).items()}
        t1 = time.perf_counter()
        text = any(loss.schedule(step) and "text" in loss.needs for loss in losses)
        outputs = model(batch["image"], batch.get("text") if text else None)
        _sync(device)
        t2 = time.perf_counter()
        outputs["loss_terms"] = {}  # (loss type, term) -> weighted term, read by the adversarial loss
        total = torch.zeros((), device=device)
        for loss in losses:
            w = loss.schedule(step)
            if w:
                tw = loss.term_weights()
                for name, value in loss(batch, outputs, step).terms.items():
                    weighted = w * tw.get(name, 1.0) * value.float()
                    key = (loss.cfg.type, name)
                    outputs["loss_terms"][key] = outputs["loss_terms"][key] + weighted if key in outputs["loss_terms"] else weighted
                    total = total + weighted
        _sync(device)
        t3 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        total.backward()
        _sync(device)
        t4 = time.perf_counter()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        _sync(device)
        t5 = time.perf_counter()
        for key, dt in zip(parts, (t1 - t0, t2 - t1, 0.0, t3 - t2, t4 - t3, t5 - t4)):
            parts[key] += dt
    parts["quantizer"] = q_time[0]
    return time.perf_counter() - start, parts


def full_trainer(exp: Any) -> float:
    from core.trainer import train

    return train(exp).train_seconds


def bench_train(args: argparse.Namespace) -> int:
    from core.cli import positive

    for opt in ("steps", "repeats", "threads"):
        positive(getattr(args, opt), f"--{opt}")
    _experiment(args, "check", False)  # a missing or invalid experiment fails here, before any run
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        import os

        old = os.getcwd()
        os.chdir(tmp)  # the throw-away mlflow.db and runs/ live here
        try:
            full_t, mini_t = [], []
            for r in range(args.repeats):
                mini_t.append(minimal_loop(_experiment(args, f"mini{r}", False))[0])
                full_t.append(full_trainer(_experiment(args, f"full{r}", True)))
            _, parts = minimal_loop(_experiment(args, "profile", False), profile=True)
        finally:
            os.chdir(old)
    exp = _experiment(args, "x", False)
    images = exp.train.batch_size * args.steps
    full, mini = statistics.median(full_t), statistics.median(mini_t)
    print(f"experiment {args.experiment} ({args.steps} steps x batch {exp.train.batch_size}, {args.threads} thread(s), "
          f"median of {args.repeats} alternating runs)")
    print(f"  full trainer (tracking on): {images / full:8.1f} images/s  ({full:.2f} s; runs {', '.join(f'{t:.2f}' for t in full_t)})")
    print(f"  minimal hand-written loop : {images / mini:8.1f} images/s  ({mini:.2f} s; runs {', '.join(f'{t:.2f}' for t in mini_t)})")
    print(f"  trainer overhead: {100 * (full / mini - 1):+.1f}%  (target <= 3%)")
    total = sum(v for k, v in parts.items() if k != "quantizer")
    print("  share of step time (profiled minimal loop):")
    for k, v in parts.items():
        note = " (inside forward)" if k == "quantizer" else ""
        print(f"    {k:<11} {100 * v / total:5.1f}%  {1000 * v / args.steps:7.2f} ms/step{note}")
    return 0


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", default=str(QUICKSTART), help="experiment YAML (default: the quick start)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
