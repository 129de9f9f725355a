"""``python -m core.bench generation``: the generation evaluator's cost on the shipped 32 px / 8x8-token
experiments, and the key/value cache's speed-up.

Per experiment: a tokenizer is trained briefly (``--tokenizer-steps``; not timed), then, with the
generation evaluator's config (the experiment's ``generation`` entry, else its defaults, plus
``--set key=value`` overrides), each stage is timed once: encoding the train split, training the
prior, sampling ``--n`` images with guidance through the KV cache (decoding included). The budget
line is prior training + sampling (the issue's "<= 2 minutes for 1,000 images on 2 cores"); with
encoding it is the evaluator's whole cost before the FD. The speed-up compares the cached and the
uncached sampler on the same ``--compare-n`` images in the same process (same guidance, same seed:
they draw the same tokens up to rounding: the two compute logits with differently shaped matrix
products, ~1e-6 apart, so a uniform landing that close to a CDF boundary picks the neighbouring code
and that image's later tokens diverge; the share of identical images is printed). The load average is printed: on a shared machine the times are upper
bounds. The evaluator is taken from the plugin registry (core never imports a plugin).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_EXPERIMENTS = ["experiments/quickstart.yaml", "experiments/supervision.yaml"]


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", action="append", help=f"experiment file (repeatable; default: {', '.join(DEFAULT_EXPERIMENTS)})")
    p.add_argument("--tokenizer-steps", type=int, default=100, help="steps of the (untimed) tokenizer training")
    p.add_argument("--n", type=int, default=1000, help="images sampled with guidance through the KV cache")
    p.add_argument("--compare-n", type=int, default=256, help="images sampled by both samplers for the speed-up")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="generation evaluator config overrides")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")


def _tokenizer(path: str, steps: int, out_dir: str) -> tuple[Any, Any]:
    from core.config import load_experiment
    from core.trainer import build, train

    over = [f"train.steps={steps}", f"train.out_dir={out_dir}", "train.progress=false", "train.eval_size=32",
            "train.eval_every=0", "train.ckpt_every=0", "tracking.enabled=false", "eval=[]"]
    exp = load_experiment(path, over)
    built = build(exp)
    model = train(exp, built=built).model
    return exp, built, model.eval()


def _generation(exp_path: str, sets: list[str]) -> Any:
    from core.config import parse_override, read_yaml, set_dotted
    from core.plugins import get_registry

    cls = get_registry().get("evaluators", "generation")
    raw = next((e for e in read_yaml(exp_path).get("eval", []) if isinstance(e, dict) and e.get("type") == "generation"), {})
    data = {**raw, "type": "generation"}
    for item in sets:
        parts, value = parse_override(item)
        set_dotted(data, parts, value)
    return cls(cls.Config.model_validate(data))


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def bench_one(path: str, args: argparse.Namespace, tmp: str) -> dict[str, Any]:
    exp, built, model = _tokenizer(path, args.tokenizer_steps, tmp)
    gen = _generation(path, args.set)
    cfg = gen.cfg
    (indices, labels), t_encode = _timed(lambda: gen.encode(model, built.train_set, cfg.train_images))
    bundle, t_train = _timed(lambda: gen.train_on(model, indices, labels, list(built.train_set.class_names)))
    lab = labels[torch.arange(args.n) % len(labels)]
    _, t_sample = _timed(lambda: gen.sample_images(bundle, model, lab, cfg.cfg_scale, seed=0, kv_cache=True))
    small = lab[: args.compare_n]
    (_, idx_c), t_cached = _timed(lambda: gen.sample_images(bundle, model, small, cfg.cfg_scale, seed=1, kv_cache=True))
    (_, idx_u), t_uncached = _timed(lambda: gen.sample_images(bundle, model, small, cfg.cfg_scale, seed=1, kv_cache=False))
    n_params = sum(p.numel() for p in bundle.prior.parameters())
    return {"experiment": Path(path).stem, "quantizer": exp.model.quantizer.type, "grid": list(model.grid),
            "heads": bundle.layout.sizes, "prior_params": n_params, "steps": cfg.steps, "batch_size": cfg.batch_size,
            "train_images": len(indices), "encode_s": t_encode, "train_s": t_train, f"sample_{args.n}_s": t_sample,
            "train_plus_sample_s": t_train + t_sample, "with_encode_s": t_encode + t_train + t_sample,
            "compare_n": len(small), "cached_s": t_cached, "uncached_s": t_uncached,
            "kv_speedup": t_uncached / max(t_cached, 1e-9),
            "same_images": float((idx_c == idx_u).flatten(1).all(1).float().mean()),
            "load_avg_1min": os.getloadavg()[0]}


def bench_generation(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    rows = []
    print(f"{'experiment':<12} {'quantizer':<9} {'heads':<14} {'encode':>7} {'train':>7} {f'sample{args.n}':>10} "
          f"{'train+sample':>13} {'kv speed-up':>12} {'load':>5}")
    with tempfile.TemporaryDirectory() as tmp:
        for path in args.experiment or [str(ROOT / p) for p in DEFAULT_EXPERIMENTS]:
            r = bench_one(path, args, tmp)
            rows.append(r)
            heads = f"{len(r['heads'])}x{max(r['heads'])}"
            print(f"{r['experiment']:<12} {r['quantizer']:<9} {heads:<14} {r['encode_s']:>6.1f}s {r['train_s']:>6.1f}s "
                  f"{r[f'sample_{args.n}_s']:>9.1f}s {r['train_plus_sample_s']:>12.1f}s "
                  f"{r['kv_speedup']:>11.1f}x {r['load_avg_1min']:>5.1f}", flush=True)
            print(f"  {r['experiment']}: {100 * r['same_images']:.0f}% of the {r['compare_n']} images identical from both samplers")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0
