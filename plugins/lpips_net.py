"""Shared by the ``perceptual`` loss and the ``lpips`` evaluator: build LPIPS with local weights.

The ``lpips`` package ships its calibrated linear layers but fetches the VGG16 / AlexNet trunk from
the internet through torchvision. Here the trunk is built randomly (``pnet_rand=True``) and then
filled from a local file: the configured path, else torchvision's file name in the torch hub cache.
Without the file we fail with one line naming it (never a silent random trunk).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pydantic import BaseModel, model_validator

from plugins.local_weights import read_state_dict

Backbone = Literal["vgg", "alex"]

# torchvision's checkpoint names (what torch.hub would have cached)
BACKBONE_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}
MIN_SIZE = {"vgg": 32, "alex": 64}


def backbone_file(net: str, path: Optional[str]) -> Path:
    """The trunk weight file to read: ``path`` if given, else the torch hub cache location."""
    if path is not None:
        return Path(path).expanduser()
    return Path(torch.hub.get_dir()) / "checkpoints" / BACKBONE_FILES[net]


def check_backbone_file(net: str, path: Optional[str]) -> None:
    """Raise ValueError (one line, naming the file) when the trunk weights are absent."""
    f = backbone_file(net, path)
    if not f.is_file():
        from core.needs import missing

        missing(f"LPIPS {net} backbone weights",  # --dry-run lists it; a real run stops here
                f"put torchvision's {BACKBONE_FILES[net]} there or set weights (no download without internet)", at=f)


def _trunk_key(key: str) -> str:
    """lpips names the torchvision ``features.<i>`` layers ``slice<k>.<i>``: map back."""
    _, rest = key.split(".", 1)
    return "features." + rest


def build_lpips(net: str = "vgg", path: Optional[str] = None) -> nn.Module:
    """A frozen ``lpips.LPIPS`` in eval mode whose trunk is read from the local file."""
    import lpips

    check_backbone_file(net, path)
    with warnings.catch_warnings():  # lpips still passes torchvision's deprecated `pretrained=`
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    sd = read_state_dict(backbone_file(net, path))
    trunk = model.net.state_dict()
    missing = [k for k in trunk if _trunk_key(k) not in sd]
    if missing:
        raise ValueError(f"{backbone_file(net, path)} is not a torchvision {net} checkpoint (no {_trunk_key(missing[0])})")
    model.net.load_state_dict({k: sd[_trunk_key(k)] for k in trunk})
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def lpips_distance(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Per-image LPIPS ``(B,)`` of images in [-1, 1], computed in fp32 (autocast off).

    Images smaller than the trunk's smallest workable input (its pooling stages need it: AlexNet 64,
    VGG 32 px) are first upsampled bilinearly to that size, both alike.
    """
    size = MIN_SIZE[model.pnet_type]
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, y = x.float(), y.float()
        if min(x.shape[-2:]) < size:
            x, y = (F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False) for t in (x, y))
        return model(x, y).flatten()


class LpipsWeightsFields(BaseModel):
    """Config fields shared by the perceptual loss and the lpips evaluator (same weights rule)."""

    net: Backbone = "vgg"  # LPIPS trunk: vgg (UniTok) or alex
    weights: Optional[str] = None  # local file of the torchvision trunk weights; None: the torch hub cache file

    @model_validator(mode="after")
    def _weights_present(self):
        check_backbone_file(self.net, self.weights)
        return self
