"""``python -m core.generate``: sample images of one class from a trained tokenizer and its prior.

    python -m core.generate --run RUN [--prior PRIOR] --class NAME --n 64 --cfg 2.0 --out grid.png

``RUN`` is a run directory, a checkpoint directory inside it or an MLflow run id (as for
``python -m core.tokenize``). The prior is the class-conditional autoregressive model the
``generation`` evaluator trains on the tokenizer's tokens; the trainer saves it with the run as
``<run>/generation/prior.safetensors``. Without ``--prior`` that file is used when it was trained on
the checkpoint being loaded; otherwise a prior is trained now (with the run's ``generation``
evaluator config when it has one, else that evaluator's defaults), saved there, and a second call
samples without retraining. ``--class`` takes a class name of the run's dataset or its index.
``--out``: a ``.png`` grid (``--nrow`` images per row), a ``.safetensors`` file (``images`` float32
in [-1, 1]) or a directory of PNGs.

The evaluator is reached through the plugin registry (``evaluators`` / ``generation``), never
imported: this module uses its ``Config``, ``fit``, ``sample_images``, ``save_prior``, ``load_prior``
and ``save_grid``.

Bad input -> one line ``error: <where>: <what>`` on stderr, exit status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from core.cli import OneLineParser, report
from core.errors import ConfigError

PRIOR_FILE = Path("generation") / "prior.safetensors"


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m core.generate", description="sample images of one class from a trained tokenizer and its prior",
                                epilog="example: python -m core.generate --run runs/quickstart-0123abcd --class circle --n 16 --out circles.png")
    p.add_argument("--run", required=True, help="run directory, checkpoint directory or MLflow run id")
    p.add_argument("--prior", help="prior .safetensors (default: <run>/generation/prior.safetensors, trained when missing)")
    p.add_argument("--class", dest="cls", required=True, metavar="NAME", help="class name of the run's dataset, or its index")
    p.add_argument("--n", type=int, default=64, help="images to sample")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (>= 1; 1: none; default: the evaluator's cfg_scale)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the evaluator's)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely codes of each head (0: all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--out", required=True, help=".png grid, .safetensors or a directory of PNGs")
    p.add_argument("--nrow", type=int, default=None, help="images per grid row (default: about sqrt(n))")
    p.add_argument("--device", default="cpu", help="torch device")
    return p


def generation_plugin(exp: Any) -> tuple[Any, Any]:
    """(evaluator instance, its config): the run's generation evaluator config, or the defaults."""
    from core.plugins import get_registry

    reg = get_registry()
    try:
        cls = reg.get("evaluators", "generation")
    except ConfigError:
        raise ConfigError("evaluators", "no 'generation' evaluator is registered (plugin disabled or missing)") from None
    cfg = next((e for e in exp.eval if e.type == "generation"), None) or cls.Config()
    return cls(cfg), cfg


def checkpoint_step(run: str) -> tuple[Path, int]:
    from core.checkpoint import STATE
    from core.rundir import resolve_checkpoint

    run_dir, ckpt = resolve_checkpoint(run)
    return run_dir, int(json.loads((ckpt / STATE).read_text(encoding="utf-8"))["step"])


def class_index(name: str, names: list[str]) -> int:
    if name in names:
        return names.index(name)
    if name.lstrip("-").isdigit() and 0 <= int(name) < len(names):
        return int(name)
    shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
    raise ConfigError("--class", f"unknown class '{name}' (classes: {shown}; or an index 0..{len(names) - 1})")


def get_bundle(args: argparse.Namespace, exp: Any, model: Any, gen: Any) -> Any:
    """The prior: --prior, else the run's saved one for this checkpoint, else trained now and saved."""
    if args.prior:
        bundle, _ = gen.load_prior(Path(args.prior), model, gen.cfg.group_bits)
        return bundle
    run_dir, step = checkpoint_step(args.run)
    path = run_dir / PRIOR_FILE
    if path.is_file():
        bundle, meta = gen.load_prior(path, model, gen.cfg.group_bits)
        if meta.get("tokenizer_step") == str(step):
            return bundle
        print(f"vtok: {path} was trained on the tokenizer at step {meta.get('tokenizer_step')}, the checkpoint is at "
              f"step {step}: training a new prior", file=sys.stderr)
    from core.plugins import get_registry

    train_set = get_registry().get("datasets", exp.data.type)(exp.data, split="train", seed=exp.seed)
    print(f"vtok: training the prior ({gen.cfg.steps} steps) on the train split's tokens ...", file=sys.stderr)
    bundle = gen.fit(model, train_set)
    path.parent.mkdir(parents=True, exist_ok=True)
    gen.save_prior(bundle, path, {"tokenizer_step": str(step)})
    print(f"vtok: saved the prior to {path}", file=sys.stderr)
    return bundle


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:  # a bad command line: one line printed already (core.cli)
        return int(e.code or 0)
    try:
        if args.n <= 0:
            raise ConfigError("--n", f"must be positive, got {args.n}")
        if args.cfg is not None and not (args.cfg >= 1.0 and math.isfinite(args.cfg)):
            raise ConfigError("--cfg", f"the guidance scale must be a finite number >= 1, got {args.cfg}")
        if args.temperature is not None and not (args.temperature > 0 and math.isfinite(args.temperature)):
            raise ConfigError("--temperature", f"must be a positive number, got {args.temperature}")
        if args.top_k is not None and args.top_k < 0:
            raise ConfigError("--top-k", f"must be >= 0, got {args.top_k}")
        if args.nrow is not None and args.nrow <= 0:
            raise ConfigError("--nrow", f"must be positive, got {args.nrow}")
        if args.prior and not Path(args.prior).is_file():
            raise ConfigError("--prior", f"{args.prior}: prior file not found")
        from core.rundir import load_for_inference

        exp, model = load_for_inference(args.run, device=args.device)
        gen, cfg = generation_plugin(exp)
        update = {k: v for k, v in (("temperature", args.temperature), ("top_k", args.top_k)) if v is not None}
        if update:
            gen = type(gen)(cfg.model_copy(update=update))
        bundle = get_bundle(args, exp, model, gen)
        label = class_index(args.cls, bundle.class_names)
        scale = cfg.cfg_scale if args.cfg is None else args.cfg
        images, _ = gen.sample_images(bundle, model, torch.full((args.n,), label, dtype=torch.long), scale, args.seed)
        out = args.out
        if out.endswith(".png"):
            gen.save_grid(images, Path(out), args.nrow or max(1, round(math.sqrt(args.n))))
        else:
            from core.tokenize import save_images

            save_images(out, images)
        print(f"{out}: {args.n} samples of class '{bundle.class_names[label]}' (guidance {scale:g})")
        return 0
    except ConfigError as e:
        return report(e)


if __name__ == "__main__":
    sys.exit(main())
