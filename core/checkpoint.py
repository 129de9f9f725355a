"""The checkpoint file format: atomic, checksummed checkpoints, safetensors for tensors, JSON for
the rest (no pickle). Everything about the run directory around them (naming, resume, the
completion marker, lookup, loading for inference) is core.rundir's.

Layout: ``<run_dir>/checkpoints/step_00000100/{model,optim,rng}.safetensors + state.json``.
A checkpoint is written into a temporary directory (each file fsynced), ``state.json`` last with the
sha256 of every file, then renamed into place: a reader sees a whole checkpoint or none. On load
the checksums are verified; a damaged checkpoint is skipped with a warning naming it and the
previous good one is used.

``rng.safetensors`` + ``state.json["rng"]`` hold every random state a run draws from (torch's CPU
and CUDA streams, numpy's and Python's global streams, the ``torch.Generator``s plugins hold), so a
resumed run draws exactly what the uninterrupted one would. The batch order needs no state: the
sampler's batch at step s is a pure function of (seed, s), and streams are replayed up to s.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from core.errors import ConfigError

STATE = "state.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    # clone: safetensors refuses tensors that share storage (tied weights, views)
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, str(path))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


# ---- optimizer state <-> (tensors, json) ---------------------------------------------------------


def flatten_optimizer(sd: dict[str, Any], prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {"param_groups": sd["param_groups"], "state": {}}
    for pid, st in sd["state"].items():
        plain["state"][str(pid)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}.{pid}.{k}"] = v
                plain["state"][str(pid)][k] = {"tensor": f"{prefix}.{pid}.{k}"}
            else:
                plain["state"][str(pid)][k] = v
    return tensors, plain


def unflatten_optimizer(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    state = {}
    for pid, st in plain["state"].items():
        state[int(pid)] = {k: tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v for k, v in st.items()}
    return {"state": state, "param_groups": plain["param_groups"]}


# ---- save / find / load ------------------------------------------------------------------------------


def ckpt_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: Path, step: int, model_sd: dict[str, torch.Tensor], optim_sds: dict[str, dict[str, Any]],
                    extra: dict[str, Any], keep: int = 2, generators: dict[str, torch.Generator] | None = None) -> Path:
    """Write checkpoint ``step``; ``generators``: the random generators plugins hold (see
    :func:`plugin_generators`), saved with the global random states."""
    root = ckpt_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    optim_tensors: dict[str, torch.Tensor] = {}
    optim_plain: dict[str, Any] = {}
    for name, sd in optim_sds.items():
        t, p = flatten_optimizer(sd, name)
        optim_tensors.update(t)
        optim_plain[name] = p
    rng, rng_plain = capture_rng(generators)
    _save_tensors(model_sd, tmp / "model.safetensors")
    _save_tensors(optim_tensors, tmp / "optim.safetensors")
    _save_tensors(rng, tmp / "rng.safetensors")
    files = {f: _sha256(tmp / f) for f in ("model.safetensors", "optim.safetensors", "rng.safetensors")}
    state = {"step": step, "files": files, "optimizers": optim_plain, "extra": extra, "rng": rng_plain}
    with open(tmp / STATE, "w", encoding="utf-8") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = ckpt_root(run_dir)
    return sorted(p for p in root.glob("step_*") if p.is_dir()) if root.is_dir() else []


def verify(ckpt: Path) -> str | None:
    """None if the checkpoint is whole, else what is wrong with it."""
    try:
        state = json.loads((ckpt / STATE).read_text(encoding="utf-8"))
        for name, digest in state["files"].items():
            if not (ckpt / name).is_file():
                return f"{name} missing"
            if _sha256(ckpt / name) != digest:
                return f"{name} checksum mismatch"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{STATE} unreadable ({type(e).__name__})"
    return None


def find_latest(run_dir: Path) -> Path | None:
    """The newest checkpoint that verifies; damaged ones are reported and skipped."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        problem = verify(ckpt)
        if problem is None:
            return ckpt
        print(f"vtok: warning: checkpoint {ckpt} is damaged ({problem}); falling back to an older one", file=sys.stderr)
    return None


def load_checkpoint(ckpt: Path) -> dict[str, Any]:
    problem = verify(ckpt)
    if problem is not None:
        raise ConfigError(str(ckpt), f"damaged checkpoint: {problem}")
    try:
        state = json.loads((ckpt / STATE).read_text(encoding="utf-8"))
        optim_tensors = load_file(str(ckpt / "optim.safetensors"))
        rng: dict[str, Any] = dict(load_file(str(ckpt / "rng.safetensors")))
        rng.update(state.get("rng") or {})
        return {
            "step": int(state["step"]),
            "model": load_file(str(ckpt / "model.safetensors")),
            "optimizers": {k: unflatten_optimizer(optim_tensors, v) for k, v in state["optimizers"].items()},
            "rng": rng,
            "extra": dict(state["extra"]),
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
        # whole files (the checksums match) that do not hold what a vtok checkpoint holds
        detail = f"missing {e}" if isinstance(e, KeyError) else type(e).__name__
        raise ConfigError(str(ckpt), f"not a vtok checkpoint ({detail})") from None


def check_resumable(state: dict[str, Any], ckpt: Path, modules: dict[str, torch.nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer], where: str = "train.resume") -> None:
    """A checkpoint written by another architecture (or a hand-edited one) -> one ConfigError
    naming the first tensor that does not fit, before anything is loaded. ``modules`` maps a key
    prefix (``model.``) to the module whose state it holds."""
    saved = state["model"]
    for prefix, module in modules.items():
        own = {f"{prefix}{k}": v for k, v in module.state_dict().items()}
        mine = {k for k in saved if k.startswith(prefix)}
        missing, unexpected = sorted(set(own) - mine), sorted(mine - set(own))
        if missing or unexpected:
            what = f"lacks {missing[0]}" if missing else f"holds {unexpected[0]}, which this model does not have"
            raise ConfigError(where, f"{ckpt} was written by a different model: it {what}")
        for k, v in own.items():
            if tuple(saved[k].shape) != tuple(v.shape) or saved[k].is_floating_point() != v.is_floating_point():
                raise ConfigError(where, f"{ckpt} was written by a different model: {k} has shape "
                                         f"{tuple(saved[k].shape)} ({saved[k].dtype}), this model needs {tuple(v.shape)} ({v.dtype})")
    if optimizers and not isinstance((state.get("extra") or {}).get("scheduler"), dict):
        raise ConfigError(where, f"{ckpt} lacks the learning-rate scheduler's state")
    rng = state.get("rng") or {}
    if "torch" in rng and (not torch.is_tensor(rng["torch"]) or rng["torch"].shape != torch.get_rng_state().shape):
        raise ConfigError(where, f"{ckpt}: rng.safetensors holds a torch random state of the wrong shape")
    for name, opt in optimizers.items():
        sd = state["optimizers"].get(name)
        if sd is None:
            raise ConfigError(where, f"{ckpt} lacks the state of optimizer '{name}'")
        params = [p for g in opt.param_groups for p in g["params"]]
        groups = sd.get("param_groups") or []
        if len(groups) != len(opt.param_groups) or sum(len(g.get("params", ())) for g in groups) != len(params):
            raise ConfigError(where, f"{ckpt}: optimizer '{name}' state holds other parameters than this model's")
        for pid, st in sd["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v) and v.dim() > 0 and (pid >= len(params) or v.shape != params[pid].shape):
                    raise ConfigError(where, f"{ckpt}: optimizer '{name}' state {pid}.{k} has shape {tuple(v.shape)}, not its parameter's")


# ---- random states -----------------------------------------------------------------------------------


def plugin_generators(*modules: torch.nn.Module) -> dict[str, torch.Generator]:
    """Every ``torch.Generator`` held as an attribute by a (sub)module, by dotted name: plugins
    that draw from their own stream have it saved and restored with the checkpoint."""
    found: dict[str, torch.Generator] = {}
    for i, root in enumerate(modules):
        for mname, m in root.named_modules():
            for attr, value in vars(m).items():
                if isinstance(value, torch.Generator):
                    found[".".join(p for p in (str(i), mname, attr) if p)] = value
    return found


def capture_rng(generators: dict[str, torch.Generator] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every random state a run draws from -> (tensors for rng.safetensors, JSON for state.json):
    torch's global CPU stream, each CUDA device's, numpy's and Python's global streams, and the
    generators plugins hold."""
    import random

    import numpy as np

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    for name, g in (generators or {}).items():
        tensors[f"gen.{name}"] = g.get_state()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    tensors["python"] = torch.tensor(internal, dtype=torch.int64)
    plain = {"numpy_meta": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
             "python_meta": {"version": version, "gauss_next": gauss_next}}
    return tensors, plain


def restore_rng(rng: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    """Undo :func:`capture_rng` (``rng``: the tensors and the JSON part, as :func:`load_checkpoint`
    returns them). States a checkpoint lacks (older checkpoints) are left alone."""
    import random

    import numpy as np

    torch.set_rng_state(rng["torch"])
    cuda = [rng[k] for k in sorted((k for k in rng if k.startswith("cuda")), key=lambda k: int(k[4:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    for name, g in (generators or {}).items():
        if f"gen.{name}" in rng:
            g.set_state(rng[f"gen.{name}"])
    if torch.is_tensor(rng.get("numpy")):
        meta = rng.get("numpy_meta") or {}
        np.random.set_state((meta.get("kind", "MT19937"), rng["numpy"].numpy().astype(np.uint32), meta.get("pos", 624),
                             meta.get("has_gauss", 0), meta.get("cached_gaussian", 0.0)))
    if torch.is_tensor(rng.get("python")):
        meta = rng.get("python_meta") or {}
        random.setstate((meta.get("version", 3), tuple(int(v) for v in rng["python"].tolist()), meta.get("gauss_next")))
