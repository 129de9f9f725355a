"""The quantizer's own terms (commitment, codebook, entropy, ...), each with its weight.

A term's weight is set in ONE place, the quantizer's config (``<term>_weight``, e.g.
``model.quantizer.commitment_weight``; ``Quantizer.loss_weights``); this loss adds the overall
``weight`` and schedule.

Optional ramp: a factor that falls linearly from ``ramp_from`` at step 0 to 1 at ``ramp_steps``,
on top of the usual weight / start_step / warmup_steps schedule. Which terms it multiplies:

- ``ramp_terms: null`` (default) -- every term of this loss, as BSQ-ViT
  (zhaoyue-zephyrus/bsq-vit ``transcoder/losses/vqperceptual.py``, ``VQLPIPSWithDiscriminator.forward``:
  ``cb_weight`` multiplies the whole quantizer loss, commitment included; multiplier 3, 2000 steps).
- ``ramp_terms: [entropy]`` -- only the listed terms, as Open-MAGVIT2's ``codebook_enlarge``
  (TencentARC/SEED-Voken ``src/Open_MAGVIT2/modules/losses/vqperceptual.py``,
  ``VQLPIPSWithDiscriminator.forward``: the entropy term times ``1 + ratio * max(0, 1 - step / steps)``,
  the commitment term unramped). Its ``codebook_enlarge_ratio: 3`` is ``ramp_from: 4`` here (the
  factor is 1 + 3 = 4 at step 0).
"""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field

from core.hookspecs import hookimpl
from core.interfaces import Loss, LossConfig, LossResult


class QuantizerLossConfig(LossConfig):
    type: Literal["quantizer"] = "quantizer"
    renamed = {"terms": "model.quantizer.<term>_weight (a term's weight lives in the quantizer's config)"}
    ramp_steps: int = Field(0, ge=0)  # length of the ramp from ramp_from x to 1x (0: no ramp)
    ramp_from: float = Field(3.0, ge=0)  # multiplier at step 0 (BSQ: 3; Open-MAGVIT2 codebook_enlarge 3: 4)
    ramp_terms: Optional[list[str]] = None  # terms the ramp multiplies; null: all (BSQ-ViT), [entropy]: Open-MAGVIT2


def ramp_factor(step: int, steps: int, start: float) -> float:
    """``start`` at step 0, linearly down to 1 at ``steps``, 1 afterwards."""
    if steps <= 0 or step >= steps:
        return 1.0
    return start + (1.0 - start) * step / steps


class QuantizerLoss(Loss):
    """The terms in ``outputs['quant'].losses``, each weighted by the quantizer's ``<term>_weight``."""

    Config = QuantizerLossConfig

    def __init__(self, cfg: QuantizerLossConfig, model: Any = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.weights = model.quantizer.loss_weights() if model is not None else {}  # read at build time

    def forward(self, batch: dict[str, Any], outputs: dict[str, Any], step: int) -> LossResult:
        terms = dict(outputs["quant"].losses)
        if self.cfg.ramp_terms is not None:  # per-term ramp: applied here, to the listed terms only
            r = ramp_factor(step, self.cfg.ramp_steps, self.cfg.ramp_from)
            terms = {k: v * r if k in self.cfg.ramp_terms else v for k, v in terms.items()}
        return LossResult(terms)

    def term_weights(self) -> dict[str, float]:
        return dict(self.weights)

    def schedule(self, step: int) -> float:
        if self.cfg.ramp_terms is not None:
            return super().schedule(step)
        return super().schedule(step) * ramp_factor(step, self.cfg.ramp_steps, self.cfg.ramp_from)


@hookimpl
def register_losses(register):
    register("quantizer", QuantizerLoss)
