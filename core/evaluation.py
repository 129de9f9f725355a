"""One evaluation pass shared by every evaluator, and the metrics the evaluators declare.

- :func:`run_evaluators`: the eval split goes through the model once; each batch's
  :class:`EvalOutputs` (computed on first use, shared) feeds every evaluator's ``update``; then
  each ``compute``. Evaluators that only override ``evaluate`` (third-party, older contract) are
  called with the loader after the pass.
- :func:`declared_metrics`: the union of the evaluators' declarations for a validated run config
  (plus the trainer's own ``skipped_steps``), ``None`` when an evaluator does not declare;
  :func:`direction_of` looks a metric up in it (placeholders ``<k>`` match one word).
"""
from __future__ import annotations

import re
from typing import Any, Optional

import torch
from torch import Tensor, nn

from core.interfaces import Evaluator

# metrics the trainer itself reports, with their direction
TRAINER_METRICS: dict[str, Optional[str]] = {"skipped_steps": "lower"}


class EvalOutputs:
    """The model's outputs on one eval batch, each computed once on first access:

    ``images`` (the batch on the device), ``forward`` (the model's forward dict), ``recon``
    (float32, clamped to [-1, 1]), ``indices`` (int64 ``(B, N, K)``), ``codes`` (the quantized
    latent on the DISCRETE path: indices -> codes; the latent itself for a continuous quantizer),
    ``post`` (post-projector output on ``codes``), ``image_embed`` (the CLIP head on ``post``)."""

    def __init__(self, model: nn.Module, images: Tensor) -> None:
        self.model, self._cache = model, {"images": images}

    def __getitem__(self, key: str) -> Any:
        if key not in self._cache:
            self._cache[key] = getattr(self, f"_{key}")()
        return self._cache[key]

    def _forward(self) -> dict[str, Any]:
        return self.model(self["images"])

    def _recon(self) -> Tensor:
        return self["forward"]["recon"].float().clamp(-1, 1)

    def _indices(self) -> Tensor:
        """From the forward's quantizer output; a model without a forward (or without ``quant`` in
        it: hand-made test models) through its ``encode``."""
        if type(self.model).forward is not nn.Module.forward:
            quant = self["forward"].get("quant")
            if quant is not None:
                return quant.indices
        return self.model.encode(self["images"])

    def _continuous(self) -> bool:
        return getattr(self.model.quantizer, "continuous", False) is True

    def _codes(self) -> Tensor:
        if self["continuous"]:
            return self["forward"]["quant"].quantized
        return self.model.quantizer.indices_to_codes(self["indices"])

    def _post(self) -> Tensor:
        return self.model.project_out(self["codes"])

    def _image_embed(self) -> Tensor:
        if self["continuous"]:
            return self.model.clip_head(self["post"])
        return self.model.image_embed_from_indices(self["indices"])


def streams(ev: Any) -> bool:
    """Whether ``ev`` follows begin / update / compute (else it only has ``evaluate``)."""
    return isinstance(ev, Evaluator) and type(ev).update is not Evaluator.update


@torch.no_grad()
def run_evaluators(model: nn.Module, evaluators: list[Any], loader: Any) -> dict[str, float]:
    """All evaluators' metrics with one pass of the eval split through the model."""
    streaming = [ev for ev in evaluators if streams(ev)]
    metrics: dict[str, float] = {}
    if streaming:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
        for ev in streaming:
            ev.begin(model, loader)
        for batch in loader:
            outputs = EvalOutputs(model, batch["image"].to(device))
            for ev in streaming:
                ev.update(batch, outputs)
    for ev in evaluators:
        if ev in streaming:
            metrics.update(ev.compute())
        elif type(ev).evaluate is Evaluator.evaluate:
            raise TypeError(f"evaluator {type(ev).__name__} implements neither update/compute nor evaluate")
        else:
            metrics.update(ev.evaluate(model, loader))
    return metrics


# ------------------------------------------------------------------------------------------------
# declared metrics
# ------------------------------------------------------------------------------------------------


def declared_metrics(exp: Any, reg: Any) -> Optional[dict[str, Optional[str]]]:
    """``{name or pattern: direction}`` a validated run config can report; None if not knowable."""
    out = dict(TRAINER_METRICS)
    for item in exp.eval:
        declared = reg.get("evaluators", item.type).declared_metrics(item)
        if declared is None:
            return None
        out.update(declared)
    return out


def pattern(name: str) -> str:
    """A declared name as a regular expression (``<placeholder>``: one word)."""
    return "".join(r"[A-Za-z0-9]+" if p.startswith("<") else re.escape(p) for p in re.split(r"(<[^>]*>)", name) if p)


def matches(metric: str, declared: dict[str, Optional[str]]) -> Optional[str]:
    """The declared name ``metric`` matches (an exact name before a pattern), or None."""
    if metric in declared:
        return metric
    return next((n for n in declared if "<" in n and re.fullmatch(pattern(n), metric)), None)


def direction_of(metric: str, declared: dict[str, Optional[str]]) -> tuple[bool, Optional[str]]:
    """(declared?, its direction)."""
    name = matches(metric, declared)
    return (name is not None), (declared[name] if name is not None else None)
