"""Checks of what the user controls outside the config's values, made before any run directory,
MLflow run or journal entry exists: the environment (tracking store, torchrun variables, cache and
output directories), the device, and whether the model can be allocated at all.

Each raises :class:`ConfigError` naming where the problem is (an option path or an environment
variable). ``python -m core.run`` calls :func:`check_run` before training and, with ``--dry-run``,
lists what fails here as what a real run needs instead of stopping.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from core.errors import ConfigError

_TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def check_world_size() -> None:
    """``WORLD_SIZE`` > 1 only makes sense under torchrun, which also sets RANK, MASTER_ADDR, ..."""
    raw = os.environ.get("WORLD_SIZE")
    if raw is None:
        return
    try:
        world = int(raw)
    except ValueError:
        raise ConfigError("WORLD_SIZE", f"not an integer ({raw!r})") from None
    if world < 1:
        raise ConfigError("WORLD_SIZE", f"must be >= 1, got {world}")
    lacking = [v for v in _TORCHRUN_VARS if v not in os.environ]
    if world > 1 and lacking:
        raise ConfigError("WORLD_SIZE", f"set to {world} but {', '.join(lacking)} not: launch distributed runs with "
                                        "torchrun --nproc_per_node=N -m core.run ..., or unset WORLD_SIZE")
    for v in ("RANK", "LOCAL_RANK"):
        if world > 1 and not os.environ[v].isdigit():
            raise ConfigError(v, f"not a non-negative integer ({os.environ[v]!r})")


def check_directory(path: str | Path, where: str) -> None:
    """``path`` is (or can be created as) a writable directory: not a file, not under a file."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ConfigError(where, f"{p} is a file, not a directory")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(where, f"{p} lies under the file {parent}")
            if not os.access(parent if not p.exists() else p, os.W_OK):
                raise ConfigError(where, f"{p if p.exists() else parent} is not writable")
            return


def check_cache_dirs(exp: Any) -> None:
    if os.environ.get("VTOK_CACHE"):
        check_directory(os.environ["VTOK_CACHE"], "VTOK_CACHE")
    for i, ev in enumerate(getattr(exp, "eval", [])):
        if getattr(ev, "cache_dir", None):
            check_directory(ev.cache_dir, f"eval.{i}.cache_dir")


def check_device(name: str, where: str = "train.device") -> None:
    """The device exists on this machine (``cuda`` needs a CUDA device, ``cuda:3`` a fourth one)."""
    import torch

    if name == "auto":
        return
    dev = torch.device(name)
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError(where, f"'{name}' asked for, but torch sees no CUDA device here (use auto or cpu)")
        if dev.index is not None and dev.index >= n:
            raise ConfigError(where, f"'{name}' asked for, but this machine has {n} CUDA device(s)")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError(where, f"'{name}' asked for, but MPS is not available here (use auto or cpu)")
    elif dev.type != "cpu":
        raise ConfigError(where, f"'{name}': vtok trains on cpu, cuda or mps")


def memory_bytes(device: str) -> int | None:
    """Total memory of the training device (physical RAM for the CPU), None if unknown."""
    import torch

    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        dev = torch.device(device if device != "auto" else "cuda")
        return torch.cuda.get_device_properties(dev.index or 0).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _fmt(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1024 or unit == "PB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PB"


def check_allocation(exp: Any) -> None:
    """Estimate the bytes the model's training state takes — parameters x4 (weights, gradients, two
    AdamW moments) plus buffers — on the meta device (nothing allocated) and refuse a model that
    cannot fit in the device's whole memory, naming its largest component."""
    import torch

    from core.model import Tokenizer

    try:
        with torch.device("meta"):
            model = Tokenizer(exp.model, exp.data.image_size)
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - a component that cannot be built on meta: the real build reports it
        return
    per: dict[str, int] = {}
    for name, p in model.named_parameters():
        per[name.split(".")[0]] = per.get(name.split(".")[0], 0) + 4 * p.numel() * p.element_size()
    for name, b in model.named_buffers():
        per[name.split(".")[0]] = per.get(name.split(".")[0], 0) + b.numel() * b.element_size()
    total, limit = sum(per.values()), memory_bytes(exp.train.device)
    if limit is not None and per and total > limit:
        part = max(per, key=per.get)
        raise ConfigError(f"model.{part}", f"the model's training state needs about {_fmt(total)} ({_fmt(per[part])} "
                                           f"for model.{part}), more than this machine's {_fmt(limit)}")


def check_run(exp: Any) -> None:
    """Everything above, in the order a user would fix it."""
    from core.tracking import check_uri

    check_world_size()
    check_device(exp.train.device)
    check_directory(exp.train.out_dir, "train.out_dir")
    check_cache_dirs(exp)
    if exp.tracking.enabled:
        check_uri(exp.tracking.uri)
    check_allocation(exp)
