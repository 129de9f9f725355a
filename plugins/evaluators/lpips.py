"""LPIPS of reconstructions (same network and local-weights rule as the ``perceptual`` loss)."""
from __future__ import annotations

from typing import Literal

import torch

from core.hookspecs import hookimpl
from core.interfaces import ComponentConfig, Evaluator
from plugins.lpips_net import LpipsWeightsFields, build_lpips, lpips_distance


class LpipsConfig(ComponentConfig, LpipsWeightsFields):
    type: Literal["lpips"] = "lpips"


class Lpips(Evaluator):
    """Perceptual distance: ``lpips_<net>`` (mean over the eval set, lower is better)."""

    Config = LpipsConfig

    def __init__(self, cfg: LpipsConfig) -> None:
        super().__init__(cfg)
        self.net = build_lpips(cfg.net, cfg.weights)

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
