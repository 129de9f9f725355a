"""LPIPS of reconstructions (same network and local-weights rule as the ``perceptual`` loss)."""
from __future__ import annotations

from typing import Literal

import torch

from core.hookspecs import hookimpl
from core.interfaces import ComponentConfig, Evaluator
from plugins.evaluators._common import device_of
from plugins.lpips_net import LpipsWeightsFields, build_lpips, lpips_distance


class LpipsConfig(ComponentConfig, LpipsWeightsFields):
    type: Literal["lpips"] = "lpips"


class Lpips(Evaluator):
    """Perceptual distance: ``lpips_<net>`` (mean over the eval set, lower is better)."""

    Config = LpipsConfig

    def __init__(self, cfg: LpipsConfig) -> None:
        super().__init__(cfg)
        self.net = build_lpips(cfg.net, cfg.weights)

    @classmethod
    def declared_metrics(cls, cfg: LpipsConfig) -> dict[str, str]:
        return {f"lpips_{cfg.net}": "lower"}

    def begin(self, model, loader) -> None:
        self.net = self.net.to(device_of(model))
        self.total, self.n = 0.0, 0

    @torch.no_grad()
    def update(self, batch, outputs) -> None:
        x = outputs["images"]
        self.total += lpips_distance(self.net, outputs["recon"], x).sum().item()
        self.n += x.shape[0]

    def compute(self) -> dict[str, float]:
        return {f"lpips_{self.cfg.net}": self.total / max(self.n, 1)}


@hookimpl
def register_evaluators(register):
    register("lpips", Lpips)
