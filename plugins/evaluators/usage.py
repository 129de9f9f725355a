"""Codebook health over the WHOLE eval split: usage (two definitions), perplexity, dead codes, bits.

Code counts are accumulated over every batch of the eval split and the statistics computed once
from the totals (never per batch and averaged). For sub-codebook k of size n_k with empirical code
distribution p_k over the split's tokens:

- ``usage`` (default definition): % of codes used at least once in the split -- the convention of
  SEED-Voken (``evaluation_image.py``: a code counts when its count over the split is > 0) and of
  1d-tokenizer (``evaluator/evaluator.py``, ``VQGANEvaluator``: the set of indices seen / codebook
  size). Mean over sub-codebooks; ``usage_min`` is the worst one.
- ``usage_freq``: % of codes whose frequency in the split exceeds ``freq_threshold`` / n_k
  (0.01 / n_k: the threshold of UniTok's training metric, FoundationVision/UniTok
  ``models/quant.py``, which vtok logs per batch as ``quant/usage``; here over the whole split).
  Always <= ``usage``; it discounts codes chosen only a handful of times.
- ``perplexity`` = mean_k exp(H(p_k)); ``dead_codes`` = codes never used (total);
  ``bits_used`` = sum_k H(p_k) / ln 2 (an upper bound on the information per token the codes
  carry) and ``bits_capacity`` = sum_k log2 n_k.

With 2 .. ``per_codebook_max`` sub-codebooks also ``usage_<k>``, ``usage_freq_<k>`` and
``perplexity_<k>``.
"""
from __future__ import annotations

import math
from typing import Literal, Optional

import torch
from pydantic import Field
from torch import Tensor

from core.hookspecs import hookimpl
from core.interfaces import ComponentConfig, Evaluator
from plugins.evaluators._common import device_of


class UsageConfig(ComponentConfig):
    type: Literal["usage"] = "usage"
    # usage_freq: a code counts when its frequency over the split exceeds freq_threshold / codebook size
    freq_threshold: float = Field(0.01, ge=0)
    per_codebook_max: int = Field(16, ge=0)  # report usage_<k> / usage_freq_<k> / perplexity_<k> when K is at most this


def code_counts(indices: Tensor, codebook_sizes: list[int]) -> list[Tensor]:
    """int64 ``(..., K)`` -> per sub-codebook histogram of length size_k (on the indices' device)."""
    flat = indices.reshape(-1, indices.shape[-1]).long()
    return [torch.bincount(flat[:, k], minlength=n)[:n] for k, n in enumerate(codebook_sizes)]


def usage_stats(counts: list[Tensor], freq_threshold: float = 0.01, per_codebook_max: int = 16) -> dict[str, float]:
    """The metrics above from per sub-codebook counts over the whole split."""
    out: dict[str, float] = {}
    usages, freqs, perps, bits, dead = [], [], [], [], 0
    for c in counts:
        c = c.cpu()
        n = c.numel()
        p = c.double() / c.sum().clamp_min(1)
        used = int((c > 0).sum())
        entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
        usages.append(100.0 * used / n)
        freqs.append(100.0 * int((p > freq_threshold / n).sum()) / n)
        perps.append(math.exp(entropy))
        bits.append(entropy / math.log(2))
        dead += n - used
    out["usage"] = sum(usages) / len(usages)
    out["usage_min"] = min(usages)
    out["usage_freq"] = sum(freqs) / len(freqs)
    out["perplexity"] = sum(perps) / len(perps)
    out["dead_codes"] = float(dead)
    out["bits_used"] = sum(bits)
    out["bits_capacity"] = sum(math.log2(c.numel()) for c in counts)
    if len(counts) <= per_codebook_max and len(counts) > 1:
        out.update({f"usage_{k}": u for k, u in enumerate(usages)})
        out.update({f"usage_freq_{k}": u for k, u in enumerate(freqs)})
        out.update({f"perplexity_{k}": q for k, q in enumerate(perps)})
    return out


class Usage(Evaluator):
    """Codebook usage over the whole eval split: ``usage`` (used at least once), ``usage_min``,
    ``usage_freq`` (frequency above 0.01/K), ``perplexity``, ``dead_codes``, ``bits_used``, ``bits_capacity``."""

    Config = UsageConfig

    @classmethod
    def declared_metrics(cls, cfg: UsageConfig) -> dict[str, Optional[str]]:
        out: dict[str, Optional[str]] = {"usage": "higher", "usage_min": "higher", "usage_freq": "higher",
                                         "perplexity": "higher", "dead_codes": "lower", "bits_used": "higher",
                                         "bits_capacity": None}  # set by the configuration: no better side
        if cfg.per_codebook_max > 1:  # per sub-codebook k (the count K is the quantizer's)
            out.update({"usage_<k>": "higher", "usage_freq_<k>": "higher", "perplexity_<k>": "higher"})
        return out

    def begin(self, model, loader) -> None:
        self.sizes = list(model.quantizer.codebook_sizes)
        device = device_of(model)
        self.totals = [torch.zeros(n, dtype=torch.long, device=device) for n in self.sizes]

    def update(self, batch, outputs) -> None:  # counts stay on the device; one transfer at the end
        for t, c in zip(self.totals, code_counts(outputs["indices"], self.sizes)):
            t += c

    def compute(self) -> dict[str, float]:
        return usage_stats(self.totals, self.cfg.freq_threshold, self.cfg.per_codebook_max)


@hookimpl
def register_evaluators(register):
    register("usage", Usage)
