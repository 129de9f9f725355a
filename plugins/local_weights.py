"""Shared helpers for plugins that read pretrained weights from local files (no downloads here)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


def require_file(path: str | Path, what: str) -> Path:
    """The path as a Path; ValueError (one line naming the file) when it is not a file."""
    p = Path(path).expanduser()
    if not p.is_file():
        from core.needs import missing

        missing(what, "weights cannot be downloaded here; give a local file", at=p)  # --dry-run lists it
    return p


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A ``.safetensors`` or torch-pickled (weights-only) state dict."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return sd.get("state_dict", sd) if isinstance(sd, dict) else sd


def load_timm_local(name: str, weights: str | Path, **kwargs: Any) -> nn.Module:
    """A timm model with weights from a local file; timm's own checkpoint filter adapts the
    checkpoint (e.g. resamples position embeddings to ``img_size``)."""
    import timm

    overlay = {"file": str(Path(weights).expanduser())}
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
