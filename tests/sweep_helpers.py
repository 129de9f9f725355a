"""A tiny grid sweep (4 cells x 2 seeds, 16 px shapes, a few steps) shared by the sweep tests."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

TINY = {
    "name": "tiny_sweep",
    "data": {"type": "shapes", "image_size": 16, "train_size": 64},
    "model": {
        "encoder": {"type": "conv", "width": 8, "downsample": 4, "channel_mult": [1, 1]},
        "pre_projector": {"type": "linear"},
        "quantizer": {"type": "vq", "codebook_size": 16, "code_dim": 4},
        "post_projector": {"type": "linear"},
        "decoder": {"type": "conv", "width": 8, "channel_mult": [1, 1]},
    },
    "losses": [{"type": "pixel"}, {"type": "quantizer"}],
    "train": {"steps": 3, "batch_size": 8, "eval_size": 16, "progress": False, "optimizer": {"lr": 1.0e-3}},
    "eval": [{"type": "psnr_ssim"}],
    "sweep": {
        "seeds": [0, 1],
        "space": {
            "model.quantizer": {
                "vq16": {"type": "vq", "codebook_size": 16, "code_dim": 4},
                "mcq2x8": {"type": "mcq", "codes_per_token": 2, "codebook_size": 8, "code_dim": 2},
                "rq": {"type": "rq", "codes_per_token": 2, "codebook_size": 8, "code_dim": 4},
            },
            # conditional: only the rq cells vary their depth -> 2 + 2 = 4 cells
            "model.quantizer.codes_per_token": {"choices": [1, 2], "when": {"model.quantizer": "rq"}},
        },
        "objective": {"metric": "psnr", "direction": "maximize"},
        "threads_per_worker": 1,
    },
    "paper": {"source": "test", "metrics": {"psnr": "higher"}},
}
TINY_KEYS = {f"{c}#seed={s}" for c in ("vq16", "mcq2x8", "rq/1", "rq/2") for s in (0, 1)}


def write_tiny(d: Path, **changes: Any) -> Path:
    """Write the tiny sweep (tracking into ``d/mlflow.db``) with dotted-key ``changes`` applied."""
    from core.config import set_dotted

    cfg = yaml.safe_load(yaml.safe_dump(TINY, sort_keys=False))
    cfg["tracking"] = {"uri": f"sqlite:///{d / 'mlflow.db'}"}
    cfg["train"]["out_dir"] = str(d / "runs")
    cfg["sweep"]["storage"] = str(d / "journal.log")
    for k, v in changes.items():
        set_dotted(cfg, k.split("."), v)
    path = d / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def load(path: Path, *overrides: str) -> tuple[dict, Any]:
    from core.config import apply_overrides, read_yaml, validate

    raw = apply_overrides(read_yaml(path), list(overrides))
    return raw, validate(raw)


def run_sweep(path: Path, *overrides: str) -> int:
    from core import sweep

    raw, exp = load(path, *overrides)
    return sweep.main(str(path), raw, exp, overrides=overrides)


def trials(path: Path, *overrides: str) -> list[Any]:
    """The study's trials as the report reads them (``TrialView``: state, value, typed record)."""
    from core.sweep import study as st

    raw, exp = load(path, *overrides)
    return st.read_trials(st.open_study(exp, exp.sweep, create=False))


def keys(views: list[Any], state: str = "COMPLETE") -> list[str]:
    return [t.record.key for t in views if t.state == state]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(args: list[str], cwd: Path, module: str = "core.run", **kw: Any) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([PY, "-m", module, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)
