"""Codebook health over the whole eval set: usage, perplexity, dead codes, bits actually used.

For sub-codebook k with empirical code distribution p_k over the eval set's tokens:
``usage_k`` = % of its codes with frequency > ``min_frequency`` / size_k (UniTok counts a code
as used when its batch frequency exceeds 0.01/K; the default 0 here means "used at least once"),
``perplexity_k`` = exp(H(p_k)), ``bits_k`` = H(p_k) / ln 2. Reported: ``usage`` (mean %),
``usage_min`` (worst sub-codebook, %), ``perplexity`` (mean), ``dead_codes`` (total codes at or
below the threshold), ``bits_used`` (sum of bits_k: an upper bound on the information per token
the codes carry) and ``bits_capacity`` (sum of log2 size_k); with at most ``per_codebook_max``
sub-codebooks also ``usage_<k>`` and ``perplexity_<k>``.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from core.hookspecs import hookimpl
from core.interfaces import ComponentConfig, Evaluator
from plugins.evaluators._common import device_of


class UsageConfig(ComponentConfig):
    type: Literal["usage"] = "usage"
    min_frequency: float = Field(0.0, ge=0)  # a code is used when its frequency > min_frequency / codebook size
    per_codebook_max: int = Field(16, ge=0)  # report usage_<k> / perplexity_<k> when K is at most this


def code_counts(indices: Tensor, codebook_sizes: list[int]) -> list[Tensor]:
    """int64 ``(..., K)`` -> per sub-codebook histogram of length size_k."""
    flat = indices.reshape(-1, indices.shape[-1]).long().cpu()
    return [torch.bincount(flat[:, k], minlength=n)[:n] for k, n in enumerate(codebook_sizes)]


def usage_stats(counts: list[Tensor], min_frequency: float = 0.0, per_codebook_max: int = 16) -> dict[str, float]:
    out: dict[str, float] = {}
    usages, perps, bits, dead = [], [], [], 0
    for k, c in enumerate(counts):
        n = c.numel()
        p = c.double() / c.sum().clamp_min(1)
        used = int((p > min_frequency / n).sum())
        entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
        usages.append(100.0 * used / n)
        perps.append(math.exp(entropy))
        bits.append(entropy / math.log(2))
        dead += n - used
    out["usage"] = sum(usages) / len(usages)
    out["usage_min"] = min(usages)
    out["perplexity"] = sum(perps) / len(perps)
    out["dead_codes"] = float(dead)
    out["bits_used"] = sum(bits)
    out["bits_capacity"] = sum(math.log2(c.numel()) for c in counts)
    if len(counts) <= per_codebook_max and len(counts) > 1:
        out.update({f"usage_{k}": u for k, u in enumerate(usages)})
        out.update({f"perplexity_{k}": q for k, q in enumerate(perps)})
    return out


class Usage(Evaluator):
    """Codebook usage: ``usage``, ``usage_min``, ``perplexity``, ``dead_codes``, ``bits_used``, ``bits_capacity``."""

    Config = UsageConfig

    def evaluate(self, model, loader) -> dict[str, float]:
        sizes = list(model.quantizer.codebook_sizes)
        totals = [torch.zeros(n, dtype=torch.long) for n in sizes]
        device = device_of(model)
        for batch in loader:
            for t, c in zip(totals, code_counts(model.encode(batch["image"].to(device)), sizes)):
                t += c
        return usage_stats(totals, self.cfg.min_frequency, self.cfg.per_codebook_max)


@hookimpl
def register_evaluators(register):
    register("usage", Usage)
