"""Quantizer usage statistics: local sum-reducible counts in, usage / perplexity / dead codes / bit
balance out -- the ONE place these numbers are derived.

A quantizer's forward returns ``QuantizerOutput.stats``, LOCAL statistics that add up over ranks
(and over batches): ``counts`` ``(n, K)`` float, how often each code of each of the n codebooks was
chosen; ``bit_sums`` ``(d,)`` how often each bit was 1 and ``rows`` ``()`` over how many rows. No
collective runs inside the quantizer for them. The trainer keeps one flat vector per step
(:func:`flatten`), stacks the logging window's vectors, sums them over ranks with ONE collective on
the training device (:func:`reduce_steps`) and derives each step's numbers with :func:`derive`
(UniTok's per-batch definition, as the quantizers logged them before: usage of the GLOBAL batch of
that step), then averages over the steps of the window.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from core.dist import all_reduce_sum_

STAT_KEYS = ("counts", "bit_sums", "rows")  # the fields a quantizer may return, in flattening order


@torch.no_grad()
def code_counts(idx: Tensor, k: int) -> Tensor:
    """idx ``(M, n)`` codes of n codebooks of size k -> LOCAL counts ``(n, k)`` float32.

    ``index_add_`` instead of ``bincount``/``unique``: no data-dependent output size, no host sync.
    """
    m, n = idx.shape
    flat = (idx + torch.arange(n, device=idx.device) * k).reshape(-1)
    counts = torch.zeros(n * k, device=idx.device).index_add_(0, flat, torch.ones(flat.numel(), device=idx.device))
    return counts.view(n, k)


@torch.no_grad()
def bit_stats(bits: Tensor) -> dict[str, Tensor]:
    """bits ``(M, d)`` bool -> LOCAL ``bit_sums`` ``(d,)`` and ``rows`` ``()`` (float32)."""
    return {"bit_sums": bits.float().sum(0), "rows": torch.full((), float(bits.shape[0]), device=bits.device)}


@torch.no_grad()
def usage_metrics(counts: Tensor, per_codebook: bool = True) -> dict[str, Tensor]:
    """From counts ``(n, K)``: ``usage`` (% of codes with batch frequency > 0.01/K, UniTok),
    ``perplexity`` (exp of the entropy of the batch code distribution) and ``dead_codes`` (codes
    never chosen in the batch), each averaged over the n codebooks; ``usage/i`` etc. per codebook
    when n > 1. Depends on the batch size: log it beside."""
    k = counts.shape[-1]
    p = counts / counts.sum(-1, keepdim=True).clamp_min(1)
    usage = (p > 0.01 / k).float().mean(-1) * 100
    ppl = torch.exp(-torch.special.xlogy(p, p).sum(-1))
    dead = (counts == 0).float().sum(-1)
    out = {"usage": usage.mean(), "perplexity": ppl.mean(), "dead_codes": dead.mean()}
    if per_codebook and counts.shape[0] > 1:
        for i in range(counts.shape[0]):
            out.update({f"usage/{i}": usage[i], f"perplexity/{i}": ppl[i], f"dead_codes/{i}": dead[i]})
    return out


@torch.no_grad()
def bit_balance(bit_sums: Tensor, rows: Tensor) -> Tensor:
    """1 - mean_i |2 f_i - 1| with f_i = bit_sums_i / rows, the frequency of bit i being 1: 1 when every
    bit is split 50/50, 0 when every bit is constant."""
    f = bit_sums / rows.clamp_min(1)
    return 1 - (2 * f - 1).abs().mean()


@torch.no_grad()
def derive(stats: dict[str, Tensor]) -> dict[str, Tensor]:
    """Summed statistics -> the logged numbers (``usage``, ``perplexity``, ``dead_codes`` [+ ``/i``],
    ``bit_balance``), each a 0-d tensor on the statistics' device (no host sync)."""
    out: dict[str, Tensor] = {}
    if "bit_sums" in stats:
        out["bit_balance"] = bit_balance(stats["bit_sums"], stats["rows"])
    if "counts" in stats:
        out.update(usage_metrics(stats["counts"]))
    return out


def flatten(stats: dict[str, Tensor]) -> tuple[Tensor, list[tuple[str, torch.Size]]]:
    """One float32 vector of the statistics and the layout :func:`unflatten` needs."""
    keys = [k for k in STAT_KEYS if k in stats] + sorted(set(stats) - set(STAT_KEYS))
    layout = [(k, stats[k].shape) for k in keys]
    if not keys:
        return torch.zeros(0), layout
    return torch.cat([stats[k].detach().float().reshape(-1) for k in keys]), layout


def unflatten(flat: Tensor, layout: list[tuple[str, torch.Size]]) -> dict[str, Tensor]:
    out, at = {}, 0
    for k, shape in layout:
        n = shape.numel()
        out[k] = flat[at : at + n].view(shape)
        at += n
    return out


def reduce_steps(steps: list[Tensor], all_reduce: Callable[[Tensor], Tensor] = all_reduce_sum_) -> Tensor:
    """Per-step flat statistics (same layout) -> ``(T, S)`` summed over ranks with ONE collective
    (``all_reduce``: in place sum; the default is a no-op outside torch.distributed)."""
    stacked = torch.stack(steps)
    all_reduce(stacked)
    return stacked


def window_metrics(steps: list[Tensor], layout: list[tuple[str, torch.Size]],
                   all_reduce: Callable[[Tensor], Tensor] = all_reduce_sum_) -> dict[str, float]:
    """The logging window's ``quant/...`` numbers: each step's statistics summed over ranks (one
    collective for the whole window), derived per step, averaged over the steps."""
    if not steps or not layout:
        return {}
    reduced = reduce_steps(steps, all_reduce)
    per_step = [derive(unflatten(row, layout)) for row in reduced]
    names = list(per_step[0])
    means = torch.stack([torch.stack([d[k] for d in per_step]).float().mean() for k in names]).tolist()
    return dict(zip(names, means))
