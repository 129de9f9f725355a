"""Run directories: where a run lives, how it resumes, when it is finished, how it is found again.

A run of experiment ``name`` lives in ``<train.out_dir>/<name>-<config hash>/`` (:func:`run_dir_for`;
``train.steps`` and the other volatile fields are not in the hash, core.config). Its files:

- ``config.yaml`` -- the resolved experiment config, written when the run starts; what
  :func:`load_for_inference` builds the model from.
- ``checkpoints/step_<8 digits>/`` -- ``model.safetensors``, ``optim.safetensors``,
  ``rng.safetensors``, ``state.json`` (the file format is core.checkpoint's); the newest
  ``train.keep_checkpoints`` are kept.
- ``final_metrics.json`` -- the completion marker, ``{"metrics": {...}, "run_id": ...}``: written when
  the run reaches ``train.steps``, dropped when a finished run is continued (``train.steps`` raised)
  so an interrupted continuation is unfinished again.
- ``recon_<step>.png``, ``figures/`` (codebook usage), and what evaluators save
  (``generation/prior.safetensors``, ``generation/samples_<step>.png``).

``python -m core.convert`` writes a run directory of its own (any name) with ``config.yaml`` and a
weights-only ``checkpoints/step_00000000/`` (no optimizer state).

Resume (``train.resume``): ``auto`` continues from the newest checkpoint that verifies (damaged
ones are skipped with a warning), ``never`` starts over in a new ``<run dir>-<date>-<time>``
directory, a checkpoint directory (or a run directory: its newest checkpoint) continues from that
checkpoint (a damaged one is an error). A weights-only checkpoint (``core.convert``'s) starts a new
run at step 0 from its model weights (fresh optimizers, loss modules and random states).

Lookup (:func:`resolve_checkpoint`, :func:`load_for_inference`, distillation teachers): a run
directory, a checkpoint directory, a run-name prefix (``runs/clip_teacher`` names the newest run of
experiment ``clip_teacher``; any other prefix such as ``runs/quickstart-0123`` must name one run),
or an MLflow run id (its ``vtok.run_dir`` tag).
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.checkpoint import STATE, check_resumable, find_latest, list_checkpoints, verify
from core.config import config_hash
from core.errors import ConfigError

CONFIG = "config.yaml"
COMPLETE = "final_metrics.json"
_NEVER_SUFFIX = re.compile(r"-\d{8}-\d{6}$")  # train.resume=never: <run dir>-<date>-<time>


# ---- naming ------------------------------------------------------------------------------------------


def run_dir_for(exp: Any) -> Path:
    """``<train.out_dir>/<name>-<config hash>``."""
    return Path(exp.train.out_dir) / f"{exp.name}-{config_hash(exp)}"


def start(run_dir: Path, config: dict[str, Any]) -> None:
    """Create the run directory, write its ``config.yaml`` and drop the completion marker (a
    continued finished run is unfinished until it reaches its new total)."""
    import yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    clear_complete(run_dir)


# ---- the completion marker ---------------------------------------------------------------------------


def write_complete(run_dir: Path, metrics: dict[str, float], run_id: str | None) -> None:
    (Path(run_dir) / COMPLETE).write_text(json.dumps({"metrics": metrics, "run_id": run_id}, indent=1))


def read_complete(run_dir: Path) -> dict[str, Any] | None:
    """The marker's ``{"metrics", "run_id"}``, or None when the run is not finished (no marker, or
    one that does not parse: the run then finishes again)."""
    try:
        marker = json.loads((Path(run_dir) / COMPLETE).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("metrics"), dict) else None


def clear_complete(run_dir: Path) -> None:
    (Path(run_dir) / COMPLETE).unlink(missing_ok=True)


# ---- resume --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resume:
    """Where a run starts: its directory, the checkpoint to continue from (None: from scratch) and
    its step, and the completion marker found there."""

    run_dir: Path
    ckpt: Path | None
    step: int | None
    finished: dict[str, Any] | None  # the completion marker's content when the run finished (at some total)
    complete: bool  # finished at exactly train.steps: nothing to do

    @property
    def continued(self) -> bool:
        """A finished run continued to a higher ``train.steps``."""
        return self.finished is not None and self.ckpt is not None and not self.complete


def step_of(ckpt: Path | None) -> int | None:
    """The step of a ``step_00000100`` checkpoint directory (None for no checkpoint or another name)."""
    if ckpt is None:
        return None
    try:
        return int(ckpt.name.rsplit("_", 1)[-1])
    except ValueError:
        return None


def resolve_resume(exp: Any) -> Resume:
    """``train.resume`` -> :class:`Resume`. A checkpoint past ``train.steps`` is a ConfigError."""
    cfg = exp.train
    run_dir = run_dir_for(exp)
    mode = cfg.resume
    if mode == "auto":
        ckpt = find_latest(run_dir)
    elif mode == "never":
        if run_dir.exists():
            run_dir = run_dir.with_name(f"{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        ckpt = None
    else:
        ckpt = Path(mode)
        if not ckpt.is_dir():
            raise ConfigError("train.resume", f"no checkpoint directory at {mode}")
        if not (ckpt / STATE).is_file() and list_checkpoints(ckpt):  # a run directory: its newest checkpoint
            ckpt = list_checkpoints(ckpt)[-1]
        problem = verify(ckpt)
        if problem:
            raise ConfigError("train.resume", f"checkpoint {mode} is damaged: {problem}")
    step = step_of(ckpt)
    if step is not None and step > cfg.steps:
        raise ConfigError("train.steps", f"{cfg.steps} is below the {step} steps already trained in {run_dir} "
                          "(raise it, or start over with train.resume=never)")
    finished = read_complete(run_dir)
    return Resume(run_dir, ckpt, step, finished, finished is not None and ckpt is not None and step == cfg.steps)


# ---- lookup --------------------------------------------------------------------------------------------


def _experiment_of(dir_name: str) -> str:
    """``clip_teacher-0123abcd4567[-20260101-120000]`` -> ``clip_teacher``."""
    return _NEVER_SUFFIX.sub("", dir_name).rsplit("-", 1)[0]


def find_run_dir(path: str | Path) -> Path | None:
    """``path`` if it is a directory; else the run directory it is a prefix of: the newest run (by
    its newest checkpoint) of the experiment named ``path``'s last part, or the one run whose
    directory name starts with it. Only directories holding a checkpoint count; None when none
    matches; several runs of different experiments (or several runs for a prefix that is not an
    experiment name) -> ConfigError naming them."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if not p.parent.is_dir():
        return None
    runs = [d for d in p.parent.iterdir() if d.name.startswith(p.name) and not d.name.startswith(".") and d.is_dir()
            and list_checkpoints(d)]
    exact = [d for d in runs if _experiment_of(d.name) == p.name]
    if exact or len(runs) == 1:
        return max(exact or runs, key=lambda d: list_checkpoints(d)[-1].stat().st_mtime)
    if runs:
        names = ", ".join(sorted(d.name for d in runs)[:5]) + (", ..." if len(runs) > 5 else "")
        raise ConfigError(str(path), f"ambiguous run-name prefix: it matches {len(runs)} runs ({names})")
    return None


def run_dir_from_mlflow(run_id: str) -> Path:
    """The ``vtok.run_dir`` tag of MLflow run ``run_id`` (the tracking URI from the environment)."""
    if not re.fullmatch(r"[0-9a-f]{32}", run_id):
        raise ConfigError(run_id, "not a run directory, a checkpoint directory or an MLflow run id")
    from mlflow.tracking import MlflowClient

    from core.tracking import resolve_uri

    try:
        run = MlflowClient(tracking_uri=resolve_uri(None)).get_run(run_id)
    except Exception as e:  # noqa: BLE001 - MLflow raises several types for "not found"
        raise ConfigError(run_id, f"MLflow run not found ({type(e).__name__})") from None
    run_dir = run.data.tags.get("vtok.run_dir")
    if not run_dir:
        raise ConfigError(run_id, "this MLflow run has no vtok.run_dir tag")
    return Path(run_dir)


def resolve_checkpoint(path_or_run_id: str) -> tuple[Path, Path]:
    """A run directory (or run-name prefix, see :func:`find_run_dir`), a checkpoint directory or an
    MLflow run id -> (run_dir, checkpoint): the newest valid checkpoint of a run."""
    p = find_run_dir(path_or_run_id) or Path(path_or_run_id)
    if p.is_dir() and (p / STATE).is_file():
        return p.parent.parent, p
    if p.is_dir():
        latest = find_latest(p)
        if latest is None:
            raise ConfigError(str(p), "no valid checkpoint in this run directory")
        return p, latest
    run_dir = run_dir_from_mlflow(path_or_run_id)
    latest = find_latest(run_dir)
    if latest is None:
        raise ConfigError(path_or_run_id, f"the run's directory {run_dir} holds no valid checkpoint")
    return run_dir, latest


# ---- inference -----------------------------------------------------------------------------------------


def load_for_inference(path_or_run_id: str, device: str = "cpu") -> tuple[Any, Any]:
    """(experiment config, Tokenizer in eval mode with the checkpoint's weights) of a run (anything
    :func:`resolve_checkpoint` accepts)."""
    from safetensors.torch import load_file

    from core.config import read_yaml, validate
    from core.model import Tokenizer

    run_dir, ckpt = resolve_checkpoint(path_or_run_id)
    cfg_file = run_dir / CONFIG
    if not cfg_file.is_file():
        raise ConfigError(str(run_dir), f"{CONFIG} missing from the run directory")
    try:
        exp = validate(read_yaml(cfg_file))
    except ConfigError as e:
        raise ConfigError(str(cfg_file), e.message if e.path == str(cfg_file) else str(e)) from None
    model = Tokenizer(exp.model, exp.data.image_size)
    try:
        sd = load_file(str(ckpt / "model.safetensors"))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise ConfigError(str(ckpt / "model.safetensors"), f"not a readable safetensors file ({type(e).__name__})") from None
    check_resumable({"model": {k: v for k, v in sd.items() if k.startswith("model.")}, "optimizers": {}}, ckpt,
                    {"model.": model}, {}, where=str(ckpt / "model.safetensors"))
    bad = next((k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise ConfigError(str(ckpt / "model.safetensors"), f"{bad} holds non-finite values (a damaged or diverged checkpoint)")
    model.load_state_dict({k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")})
    return exp, model.to(device).eval()
