"""The quantizer's own terms (commitment, codebook, entropy, ...) with a weight per term.

Optional BSQ/LFQ-style ramp: all terms of this loss are multiplied by a factor that falls linearly
from ``ramp_from`` (BSQ: 3) to 1 over the first ``ramp_steps`` steps (BSQ: 2000), on top of the
usual weight / start_step / warmup_steps schedule.
"""
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
    ramp_steps: int = Field(0, ge=0)  # length of the ramp from ramp_from x to 1x (0: no ramp)
    ramp_from: float = Field(3.0, ge=0)  # multiplier at step 0 (BSQ: 3)


def ramp_factor(step: int, steps: int, start: float) -> float:
    """``start`` at step 0, linearly down to 1 at ``steps``, 1 afterwards."""
    if steps <= 0 or step >= steps:
        return 1.0
    return start + (1.0 - start) * step / steps


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

    def schedule(self, step: int) -> float:
        return super().schedule(step) * ramp_factor(step, self.cfg.ramp_steps, self.cfg.ramp_from)


@hookimpl
def register_losses(register):
    register("quantizer", QuantizerLoss)
