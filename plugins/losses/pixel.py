"""Pixel reconstruction loss: L1 and L2 with separate weights (UniTok: 0.2 and 1.0)."""
from __future__ import annotations

from typing import Any, Literal

import torch.nn.functional as F
from pydantic import Field

from core.hookspecs import hookimpl
from core.interfaces import Loss, LossConfig, LossResult


class PixelConfig(LossConfig):
    type: Literal["pixel"] = "pixel"
    l1: float = Field(0.2, ge=0)  # weight of mean |x - x_hat|
    l2: float = Field(1.0, ge=0)  # weight of mean (x - x_hat)^2


class PixelLoss(Loss):
    """Weighted L1 + L2 between input and reconstruction (terms ``l1``, ``l2``)."""

    Config = PixelConfig

    def __init__(self, cfg: PixelConfig, model: Any = None) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, batch: dict[str, Any], outputs: dict[str, Any], step: int) -> LossResult:
        x, y = outputs["images"].float(), outputs["recon"].float()
        return LossResult({"l1": F.l1_loss(y, x), "l2": F.mse_loss(y, x)})

    def term_weights(self) -> dict[str, float]:
        return {"l1": self.cfg.l1, "l2": self.cfg.l2}


@hookimpl
def register_losses(register):
    register("pixel", PixelLoss)
