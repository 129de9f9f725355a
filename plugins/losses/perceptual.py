"""Perceptual loss: LPIPS (Zhang et al. 2018) through the ``lpips`` package (UniTok: VGG16, weight 1).

The trunk weights are read from a local file (``weights``, else torchvision's file in the
torch hub cache); a missing file fails at config validation with one line naming it.
"""
from __future__ import annotations

from typing import Any, Literal

from torch import nn

from core.hookspecs import hookimpl
from core.interfaces import Loss, LossConfig, LossResult
from plugins.lpips_net import LpipsWeightsFields, build_lpips, lpips_distance


class PerceptualConfig(LossConfig, LpipsWeightsFields):
    type: Literal["perceptual"] = "perceptual"


class PerceptualLoss(Loss):
    """Mean LPIPS between input and reconstruction (term ``lpips``), fp32, frozen network."""

    Config = PerceptualConfig

    def __init__(self, cfg: PerceptualConfig, model: Any = None) -> None:
        super().__init__()
        self.cfg = cfg
        # frozen and large: kept out of the module tree so it is neither checkpointed nor optimised;
        # moved to the batch's device on first use
        self._net: tuple[nn.Module] = (build_lpips(cfg.net, cfg.weights),)

    @property
    def net(self) -> nn.Module:
        return self._net[0]

    def forward(self, batch: dict[str, Any], outputs: dict[str, Any], step: int) -> LossResult:
        x, y = outputs["images"], outputs["recon"]
        net = self.net.to(x.device)
        return LossResult({"lpips": lpips_distance(net, y, x).mean()})


@hookimpl
def register_losses(register):
    register("perceptual", PerceptualLoss)
