"""``python -m core.run EXP.yaml [key=value ...]``: validate, then train one run (or a sweep).

Bad input -> one line on stderr naming the problem, exit status 2, nothing written.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from typing import Any

import yaml

from core.display import plain as _plain
from core.errors import ConfigError

EXIT_BAD_INPUT = 2


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m core.run", description=_plain(__doc__.split("\n\n")[0]),
                                epilog="example: python -m core.run experiments/quickstart.yaml train.steps=200 model.quantizer.codebook_size=256")
    p.add_argument("experiment", nargs="?", help="experiment YAML file")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, values parsed as YAML")
    p.add_argument("--dry-run", action="store_true", help="validate, print the resolved config and parameter counts, exit")
    p.add_argument("--list-plugins", action="store_true", help="list every registered component and exit")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return p


def dry_run(exp: Any) -> None:
    import torch

    from core.config import to_dict
    from core.model import Tokenizer, parameter_counts

    print(yaml.safe_dump(to_dict(exp), sort_keys=False).rstrip())
    with torch.device("meta"):  # nothing is allocated: full-scale configs check in seconds
        model = Tokenizer(exp.model, exp.data.image_size)
    print("\n# parameters")
    for name, n in parameter_counts(model).items():
        print(f"{name:>16}: {n:>13,}")
    q = model.quantizer
    print(f"\n# tokens: grid {model.grid[0]}x{model.grid[1]}, {q.codes_per_token} code(s) per token, {q.bits_per_token:g} bits per token")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)  # flags may follow the key=value overrides
    try:
        if args.list_plugins:
            from core.plugins import format_plugin_list, get_registry

            print(format_plugin_list(get_registry()))
            return 0
        if not args.experiment:
            raise ConfigError("experiment", "no experiment file given (python -m core.run EXP.yaml)")
        from core.config import apply_overrides, read_yaml, validate

        raw = apply_overrides(read_yaml(args.experiment), args.overrides)
        exp = validate(raw)
        if exp.sweep:
            from core import sweep  # the sweep engine validates every cell before running any

            return sweep.main(args.experiment, raw, exp, dry_run=args.dry_run, overrides=args.overrides)
        if args.dry_run:
            dry_run(exp)
            return 0
        return train_once(exp, args.overrides)
    except ConfigError as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted: checkpoint saved; run the same command to resume", file=sys.stderr)
        return 130


def train_once(exp: Any, overrides: list[str] | None = None) -> int:
    from core import dist
    from core.display import fmt_value
    from core.tracking import run_name
    from core.trainer import build, train

    dist.setup_from_env()
    rank = dist.rank()  # read before teardown: afterwards every process looks like rank 0
    tags = {"vtok.overrides": " ".join(overrides)} if overrides else {}
    try:
        built = build(exp)  # may raise ConfigError: before any file or MLflow run exists
        result = train(exp, built=built, tags=tags, run_name=run_name(exp.name, overrides))
    finally:
        dist.teardown()
    if rank == 0:
        print(f"run directory: {result.run_dir}")
        if result.run_id:
            from core.tracking import ui_hint

            print(f"mlflow run: {result.run_id}; to look: {ui_hint(exp.tracking.uri, run_id=result.run_id)}")
        for k, v in result.metrics.items():
            print(f"{k}: {fmt_value(v)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
