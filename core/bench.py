"""Benchmarks: ``python -m core.bench quantizers [--json PATH] [--tokens N] [--heavy] ...`` and
``python -m core.bench train`` (core/bench_train.py), ``python -m core.bench generation`` (core/bench_generate.py), ``python -m core.bench eval`` (core/bench_eval.py), ``python -m core.bench cells`` (core/bench_cells.py).

``quantizers``: forward+backward time and peak extra memory of each vtok quantizer beside a naive
reference (full N x K distance matrix / full N x 2^d probabilities) and, when installed (the
``bench`` extra), vector-quantize-pytorch's closest equivalent, with ratios from the same run.

What is measured: every (case, implementation) runs in a FRESH subprocess (``run-case``). After
building the module and the input, the child resets the kernel's peak-RSS mark (Linux
``/proc/self/clear_refs``), runs one forward+backward and reports VmHWM - VmRSS(before): the extra
resident memory the first full-size step needed at its worst moment (after a 16-token warm-up) (activations, saved tensors, grads and
allocator caching; imports, module and input excluded). Memory freed by the setup and reused by
malloc is not counted, so small figures are lower bounds within a few MB. Time
is the median of ``--reps`` further forward+backward passes (after that first, warm-up pass).
The backward objective is ``sum(quantized * g) + sum(losses)`` (g fixed random), so the entropy
and codebook terms are differentiated too. Plugin classes come from ``core.plugins.get_registry()``.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from core import bench_cells, bench_eval, bench_generate, bench_train
from core.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------


@dataclass
class Impl:
    label: str
    kind: str  # "vtok" | "naive" | "vqp"
    spec: dict[str, Any]
    heavy: bool = False  # skipped unless --heavy (needs many GB or tens of seconds)


@dataclass
class Case:
    name: str
    dim: int  # latent width
    impls: list[Impl] = field(default_factory=list)


CASES = [
    Case("mcq 8x2048x8 cosine", 64, [
        Impl("vtok mcq", "vtok", {"type": "mcq", "codes_per_token": 8, "codebook_size": 2048, "code_dim": 8}),
        Impl("naive full N x K", "naive", {"fn": "vq", "n": 8, "k": 2048, "d": 8, "cosine": True}),
        Impl("vqp VectorQuantize heads=8", "vqp", {"cls": "VectorQuantize", "dim": 64, "codebook_size": 2048, "heads": 8,
                                                   "separate_codebook_per_head": True, "codebook_dim": 8, "use_cosine_sim": True}),
    ]),
    Case("vq 1x16384x64 cosine", 64, [
        Impl("vtok vq", "vtok", {"type": "vq", "codebook_size": 16384, "code_dim": 64}),
        Impl("naive full N x K", "naive", {"fn": "vq", "n": 1, "k": 16384, "d": 64, "cosine": True}),
        Impl("vqp VectorQuantize", "vqp", {"cls": "VectorQuantize", "dim": 64, "codebook_size": 16384, "use_cosine_sim": True}),
    ]),
    Case("rq 4x1024x64", 64, [
        Impl("vtok rq", "vtok", {"type": "rq", "codes_per_token": 4, "codebook_size": 1024, "code_dim": 64}),
        Impl("naive full N x K", "naive", {"fn": "rq", "depth": 4, "k": 1024, "d": 64}),
        Impl("vqp ResidualVQ", "vqp", {"cls": "ResidualVQ", "dim": 64, "num_quantizers": 4, "codebook_size": 1024}),
    ]),
    Case("lfq 2^16", 16, [
        Impl("vtok lfq exact H_ps + exact H_cb", "vtok", {"type": "lfq", "code_dim": 16, "codebook_entropy": "exact"}),
        Impl("vtok lfq exact H_ps + grouped H_cb (2x8)", "vtok",
             {"type": "lfq", "code_dim": 16, "codebook_entropy": "grouped", "entropy_group_size": 8}),
        Impl("naive full N x 2^16", "naive", {"fn": "lfq", "d": 16}, heavy=True),
        Impl("vqp LFQ", "vqp", {"cls": "LFQ", "dim": 16, "codebook_size": 2**16}, heavy=True),
    ]),
    Case("lfq 2^18", 18, [
        Impl("vtok lfq exact H_ps + exact H_cb", "vtok", {"type": "lfq", "code_dim": 18, "codebook_entropy": "exact"}),
        Impl("vtok lfq exact H_ps + grouped H_cb (2x9)", "vtok",
             {"type": "lfq", "code_dim": 18, "codebook_entropy": "grouped", "entropy_group_size": 9}),
        Impl("naive full N x 2^18", "naive", {"fn": "lfq", "d": 18}, heavy=True),
        Impl("vqp LFQ", "vqp", {"cls": "LFQ", "dim": 18, "codebook_size": 2**18}, heavy=True),
    ]),
    Case("gq 16x8 (2^128)", 128, [
        Impl("vtok gq pooled", "vtok", {"type": "gq", "codes_per_token": 16, "code_dim": 8}),
        Impl("vtok gq summed", "vtok", {"type": "gq", "codes_per_token": 16, "code_dim": 8, "codebook_entropy": "summed"}),
        Impl("naive N x g x 2^8 probs", "naive", {"fn": "gq", "g": 16, "d": 8}),
        Impl("vqp LFQ num_codebooks=16", "vqp", {"cls": "LFQ", "dim": 128, "codebook_size": 2**8, "num_codebooks": 16}),
    ]),
    Case("bsq 2^18 (groups of 9)", 18, [
        Impl("vtok bsq grouped", "vtok", {"type": "bsq", "code_dim": 18, "entropy_group_size": 9}),
        Impl("vqp LFQ spherical", "vqp", {"cls": "LFQ", "dim": 18, "codebook_size": 2**18, "spherical": True}, heavy=True),
    ]),
    Case("fsq 8,5,5,5", 4, [
        Impl("vtok fsq", "vtok", {"type": "fsq", "levels": [8, 5, 5, 5]}),
        Impl("vqp FSQ", "vqp", {"cls": "FSQ", "levels": [8, 5, 5, 5]}),
    ]),
]


# ---------------------------------------------------------------------------------------------
# naive references: core/reference_quantizers.py (shared with the numerics tests)
# ---------------------------------------------------------------------------------------------


def _naive(spec: dict[str, Any]) -> Callable:
    from core.reference_quantizers import naive  # imports torch: only in the child process

    return naive(spec)


def _build(kind: str, spec: dict[str, Any]) -> Callable:
    """-> callable z -> (quantized, scalar loss)."""
    if kind == "vtok":
        from core.plugins import get_registry

        cls = get_registry().get("quantizers", spec["type"])
        q = cls(cls.Config(**spec))

        def run(z):
            out = q(z)
            return out.quantized, sum(out.losses.values(), z.new_zeros(()))
        return run
    if kind == "naive":
        return _naive(spec)
    import vector_quantize_pytorch as vqp

    spec = dict(spec)
    mod = getattr(vqp, spec.pop("cls"))(**spec)

    def run(z):
        out = mod(z)
        loss = out[2].sum() if len(out) > 2 else z.new_zeros(())
        return out[0], loss
    return run


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            line = next(ln for ln in f if ln.startswith(field + ":"))
        return int(line.split()[1]) / 1024  # kB
    except (OSError, StopIteration):
        return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _measure_peak(step: Callable[[], None]) -> float:
    """Extra MB the step needed at its worst: VmHWM after it minus VmRSS before, with the peak mark
    reset just before. Fallback without /proc: growth of ru_maxrss (misses steps that stay under
    the import-time peak)."""
    before = _status_mb("VmRSS")
    if before is not None and _reset_peak():
        step()
        return max(0.0, (_status_mb("VmHWM") or before) - before)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base


def run_case(args: argparse.Namespace) -> None:
    """Child process: one (case, impl); prints one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    case = next(c for c in CASES if c.name == args.case)
    impl = next(i for i in case.impls if i.label == args.impl)
    fn = _build(impl.kind, impl.spec)
    batch = max(1, args.tokens // 256)
    z = torch.randn(batch, args.tokens // batch, case.dim, requires_grad=True)
    g = torch.randn_like(z)

    def step(z=z, g=g):
        z.grad = None
        quantized, loss = fn(z)
        ((quantized * g).sum() + loss).backward()

    # one-time costs (autograd worker, thread pools, lazy init) on a 1 x 16-token input first, so
    # the measured peak is the step's own; it does not pre-size malloc for the full batch
    z_small = z.detach()[:1, :16].clone().requires_grad_(True)
    step(z_small, g[:1, :16])
    import gc

    gc.collect()
    peak = _measure_peak(step)
    times = []
    for _ in range(args.reps):
        t = time.perf_counter()
        step()
        times.append((time.perf_counter() - t) * 1000)
    print(json.dumps({"ms": statistics.median(times), "peak_mb": peak}))


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------


def _vqp_available() -> bool:
    try:
        import vector_quantize_pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def _child(case: Case, impl: Impl, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "core.bench", "run-case", "--case", case.name, "--impl", impl.label,
           "--tokens", str(args.tokens), "--reps", str(args.reps), "--threads", str(args.threads)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"note": f"timeout > {args.timeout}s"}
    if res.returncode != 0:
        err = (res.stderr.strip().splitlines() or ["?"])[-1]
        return {"note": f"failed: {err[:80]}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench_quantizers(args: argparse.Namespace) -> int:
    have_vqp = _vqp_available()
    rows = []
    wanted = [c for c in CASES if not args.only or any(s in c.name for s in args.only)]
    print(f"{args.tokens} tokens, {args.threads} thread(s), median of {args.reps}; peak = extra RSS of the first full-size step in a fresh process")
    print(f"{'case':<24} {'implementation':<42} {'ms':>9} {'peak MB':>9} {'ms/vtok':>8} {'MB/vtok':>8}")
    for case in wanted:
        ref = None
        for impl in case.impls:
            if impl.kind == "vqp" and not have_vqp:
                res = {"note": "vector-quantize-pytorch not installed (pip install vtok[bench])"}
            elif impl.heavy and not args.heavy:
                res = {"note": "skipped (heavy: needs GBs / tens of seconds; --heavy runs it)"}
            else:
                res = _child(case, impl, args)
            row = {"case": case.name, "impl": impl.label, "kind": impl.kind, "tokens": args.tokens, **res}
            if ref is None and "ms" in res:
                ref = res
            if ref is not None and "ms" in res:
                row["ms_ratio"] = res["ms"] / ref["ms"]
                row["mem_ratio"] = res["peak_mb"] / ref["peak_mb"] if ref["peak_mb"] >= 0.5 else None
            rows.append(row)
            _print_row(row)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
        print(f"wrote {args.json}")
    return 0


def _print_row(row: dict[str, Any]) -> None:
    if "ms" not in row:
        print(f"{row['case']:<24} {row['impl']:<42} {row['note']}")
        return
    mem = f"{row['mem_ratio']:>8.2f}" if row.get("mem_ratio") is not None else f"{'-':>8}"
    ratio = f"{row['ms_ratio']:>8.2f} {mem}" if "ms_ratio" in row else ""
    print(f"{row['case']:<24} {row['impl']:<42} {row['ms']:>9.1f} {row['peak_mb']:>9.1f} {ratio}", flush=True)


def _add_quantizer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per batch (B x N, N = 256)")
    p.add_argument("--reps", type=int, default=3, help="timed forward+backward passes after the warm-up")
    p.add_argument("--threads", type=int, default=2, help="torch threads in each child")
    p.add_argument("--heavy", action="store_true", help="also run reference cases that need GBs / tens of seconds")
    p.add_argument("--timeout", type=float, default=600, help="seconds per case before giving up")
    p.add_argument("--only", nargs="*", help="run only cases whose name contains one of these")


def _add_run_case_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--case", required=True)
    p.add_argument("--impl", required=True)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)


#: subcommand -> (help, argument adder, handler); the trainer benchmark joins this table
COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "quantizers": ("quantizer speed and memory vs naive and vector-quantize-pytorch", _add_quantizer_args, bench_quantizers),
    "run-case": ("(internal) one quantizer case in this process", _add_run_case_args, run_case),
    "train": ("full trainer vs a minimal hand-written loop: images/s, overhead, step-time shares",
              bench_train.add_args, bench_train.bench_train),
    "cells": ("training images/s of each paper experiment's first cell, before/after the step-cost changes (core/bench_cells.py)",
              bench_cells.add_args, bench_cells.bench_cells),
    "eval": ("evaluation of an experiment's first cell: one shared pass against one pass per evaluator (core/bench_eval.py)",
             bench_eval.add_args, bench_eval.bench_eval),
    "generation": ("generation evaluator: prior training + sampling time, KV-cache speed-up (core/bench_generate.py)",
                   bench_generate.add_args, bench_generate.bench_generation),
}


def check_quantizer_args(args: argparse.Namespace) -> None:
    """Bad options fail before any case runs (a --json path that cannot be written included)."""
    from core.boundary import check_directory
    from core.cli import positive

    for opt in ("tokens", "reps", "threads", "timeout"):
        positive(getattr(args, opt), f"--{opt}")
    if getattr(args, "json", None):
        out = Path(args.json).expanduser()
        if out.is_dir():
            raise ConfigError("--json", f"{args.json} is a directory; give a file path")
        if not out.parent.is_dir():
            raise ConfigError("--json", f"the directory {out.parent} does not exist")
        check_directory(out.parent, "--json")


def main(argv: list[str] | None = None) -> int:
    from core.cli import OneLineParser, report
    from core.display import plain

    parser = OneLineParser(prog="python -m core.bench", description=plain(__doc__.split("\n\n")[0]))
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_, add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_))
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # a bad command line: one line printed already
        return int(e.code or 0)
    try:
        if args.command in ("quantizers", "run-case"):
            check_quantizer_args(args)
        return COMMANDS[args.command][2](args) or 0
    except ConfigError as e:
        return report(e)


if __name__ == "__main__":
    sys.exit(main())
