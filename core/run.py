"""``python -m core.run EXP.yaml [key=value ...]``: validate, then train one run (or a sweep).

Bad input -> one line on stderr naming the problem, exit status 2, nothing written. A run that fails
for a reason only training shows (a corrupt image, a non-finite loss) ends FAILED with one line
naming the file or the step, exit status 1.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from typing import Any

import yaml

from core.cli import EXIT_BAD_INPUT, OneLineParser
from core.display import plain as _plain
from core.errors import ConfigError, RunError, one_line

EXIT_RUN_FAILED = 1


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m core.run", description=_plain(__doc__.split("\n\n")[0]),
                      epilog="example: python -m core.run experiments/quickstart.yaml train.steps=200 model.quantizer.codebook_size=256")
    p.add_argument("experiment", nargs="?", help="experiment YAML file")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, values parsed as YAML")
    p.add_argument("--dry-run", action="store_true", help="validate, print the resolved config, parameter counts and what a real run needs, exit")
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


def plan_machine(exp: Any) -> None:
    """While planning: what the boundary checks would refuse on this machine becomes a need."""
    from core import boundary
    from core.needs import missing

    for check in (boundary.check_world_size, lambda: boundary.check_device(exp.train.device),
                  lambda: boundary.check_directory(exp.train.out_dir, "train.out_dir"), lambda: boundary.check_cache_dirs(exp),
                  lambda: boundary.check_allocation(exp)):
        try:
            check()
        except ConfigError as e:
            missing(e.path, e.message)
    root = getattr(exp.data, "root", None)  # dataset files: the dataset plugin checks them when a run builds it
    if isinstance(root, str) and not Path(root).expanduser().is_dir():
        missing(f"dataset '{exp.data.type}' directory", "download the dataset there or set data.root", at=root)
    shards = getattr(exp.data, "shards", None)
    if isinstance(shards, str) and not Path(shards.split("{")[0] + "x").expanduser().parent.is_dir():  # the first shard's directory
        missing(f"dataset '{exp.data.type}' shards", "download the shards there or set data.shards", at=shards)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_intermixed_args(argv)  # flags may follow the key=value overrides
    except SystemExit as e:  # a bad command line: OneLineParser printed the one line
        return int(e.code or 0)
    try:
        if args.list_plugins:
            from core.plugins import format_plugin_list, get_registry

            print(format_plugin_list(get_registry()))
            return 0
        if not args.experiment:
            raise ConfigError("experiment", "no experiment file given (python -m core.run EXP.yaml)")
        if args.dry_run:
            return plan(args)
        from core.boundary import check_run
        from core.config import apply_overrides, read_yaml, validate

        raw = apply_overrides(read_yaml(args.experiment), args.overrides)
        exp = validate(raw)
        check_run(exp)  # environment, device, memory: before any file, MLflow run or journal entry
        import logging

        # MLflow announces creating its SQLite tables on stderr: a failing run's one line stays one line
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        if exp.sweep:
            from core import sweep  # the sweep engine validates every cell before running any

            return sweep.main(args.experiment, raw, exp, dry_run=False, overrides=args.overrides)
        return train_once(exp, args.overrides)
    except ConfigError as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted: checkpoint saved; run the same command to resume", file=sys.stderr)
        return 130
    except RecursionError:
        if args.debug:
            traceback.print_exc()
        print(f"error: {args.experiment}: nested too deeply to read", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:  # noqa: BLE001 - failures only a run shows: the run is FAILED, one line here
        from core.trainer import NonFiniteLoss

        if not isinstance(e, (RunError, NonFiniteLoss)):
            raise
        if args.debug:
            traceback.print_exc()
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_RUN_FAILED


def plan(args: argparse.Namespace) -> int:
    """``--dry-run``: validate as a real run would, but list missing weight files, teacher runs,
    devices and memory as what a real run needs instead of stopping at them."""
    from core.config import apply_overrides, read_yaml, validate
    from core.needs import format_needs, planning

    with planning() as needs:
        raw = apply_overrides(read_yaml(args.experiment), args.overrides)
        exp = validate(raw)
        plan_machine(exp)
        if exp.sweep:
            from core import sweep

            code = sweep.main(args.experiment, raw, exp, dry_run=True)
        else:
            dry_run(exp)
            code = 0
    print("\n" + format_needs(needs))
    return code


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
