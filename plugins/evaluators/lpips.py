"""LPIPS of reconstructions (same network and local-weights rule as the ``perceptual`` loss)."""
from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import model_validator

from core.hookspecs import hookimpl
from core.interfaces import ComponentConfig, Evaluator
from plugins.lpips_net import Backbone, build_lpips, check_backbone_file, lpips_distance


class LpipsConfig(ComponentConfig):
    type: Literal["lpips"] = "lpips"
    net: Backbone = "vgg"  # LPIPS trunk: vgg or alex
    backbone_path: Optional[str] = None  # torchvision trunk weights; None: the torch hub cache file

    @model_validator(mode="after")
    def _weights_present(self) -> "LpipsConfig":
        check_backbone_file(self.net, self.backbone_path)
        return self


class Lpips(Evaluator):
    """Perceptual distance: ``lpips_<net>`` (mean over the eval set, lower is better)."""

    Config = LpipsConfig

    def __init__(self, cfg: LpipsConfig) -> None:
        super().__init__(cfg)
        self.net = build_lpips(cfg.net, cfg.backbone_path)

    @torch.no_grad()
    def evaluate(self, model, loader) -> dict[str, float]:
        device = next(model.parameters()).device
        net = self.net.to(device)
        total, n = 0.0, 0
        for batch in loader:
            x = batch["image"].to(device)
            y = model(x)["recon"].float().clamp(-1, 1)
            total += lpips_distance(net, y, x).sum().item()
            n += x.shape[0]
        return {f"lpips_{self.cfg.net}": total / max(n, 1)}


@hookimpl
def register_evaluators(register):
    register("lpips", Lpips)
