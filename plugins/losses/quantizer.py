"""The quantizer's own terms (commitment, codebook, entropy, ...) with a weight per term."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from torch import Tensor

from core.hookspecs import hookimpl
from core.interfaces import Loss, LossConfig


class QuantizerLossConfig(LossConfig):
    type: Literal["quantizer"] = "quantizer"
    # per-term weight; unlisted terms take the quantizer's paper weight (Quantizer.loss_weights), else 1
    terms: dict[str, float] = Field(default_factory=dict)


class QuantizerLoss(Loss):
    """The terms in ``outputs['quant'].losses``, each weighted by ``terms`` or the quantizer's default."""

    Config = QuantizerLossConfig

    def __init__(self, cfg: QuantizerLossConfig, model: Any = None) -> None:
        super().__init__()
        self.cfg = cfg
        defaults = model.quantizer.loss_weights() if model is not None else {}
        self.weights = {**defaults, **cfg.terms}

    def forward(self, batch: dict[str, Any], outputs: dict[str, Any], step: int) -> dict[str, Tensor]:
        return dict(outputs["quant"].losses)

    def term_weights(self) -> dict[str, float]:
        return dict(self.weights)


@hookimpl
def register_losses(register):
    register("quantizer", QuantizerLoss)
