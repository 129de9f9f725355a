"""Brute-force reference quantizers in plain torch: the full N x K distance matrix, the full
N x 2^d code probabilities. Slow and memory-hungry on purpose (nothing chunked, nothing factored),
so they are easy to check by eye. Used by the numerics tests (tests/test_quantizers_*.py) as the
ground truth and by ``python -m core.bench quantizers`` as the naive baseline.

Core module: it imports no plugin.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F


def corners(d: int, big_endian: bool = False) -> torch.Tensor:
    """All 2^d codes in {-1, 1}^d, shape (2^d, d); row j is the code of index j, bit k of j
    (little-endian: bit k is column k; big-endian: bit k is column d-1-k) set means +1."""
    shifts = torch.arange(d - 1, -1, -1) if big_endian else torch.arange(d)
    return ((torch.arange(2**d)[:, None] >> shifts) & 1).float() * 2 - 1


def brute_entropies(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean per-sample entropy, entropy of the mean distribution) of softmax(logits) over the last
    axis, logits (N, K) over the whole codebook."""
    p = torch.softmax(logits, dim=-1)
    h_ps = -(p * p.clamp_min(1e-30).log()).sum(-1).mean()
    pm = p.mean(0)
    return h_ps, -(pm * pm.clamp_min(1e-30).log()).sum()


def nearest(x: torch.Tensor, codebook: torch.Tensor, distance: str) -> torch.Tensor:
    """Index of the nearest code for every row of x (..., d) in codebook (..., K, d), from the full
    distance / similarity matrix: ``euclidean`` = smallest L2 distance, ``dot`` = largest inner
    product, ``cosine`` = largest inner product of the L2-normalised vectors."""
    if distance == "euclidean":
        return torch.cdist(x, codebook).argmin(-1)
    if distance == "cosine":
        x, codebook = F.normalize(x, dim=-1), F.normalize(codebook, dim=-1)
    elif distance != "dot":
        raise ValueError(distance)
    return (x @ codebook.transpose(-1, -2)).argmax(-1)


def naive(spec: dict[str, Any]) -> Callable:
    """A brute-force quantizer ``z -> (quantized, scalar loss)`` for the benchmark; ``spec["fn"]``:

    - ``vq`` (n codebooks of k codes of width d, ``cosine`` or euclidean): the full (n, N, K)
      matrix; loss = 0.25 commitment + codebook MSE.
    - ``rq`` (depth stages of k codes of width d): full (N, K) distances per stage.

    The codebooks of ``vq`` / ``rq`` are ``run.codebook`` (to copy into a plugin under test).
    - ``lfq`` / ``gq`` (width d per group): the full N x 2^d softmax at temperature 0.01; loss =
      0.1 (per-sample - codebook entropy) + 0.25 commitment.
    """
    fn = spec["fn"]
    if fn == "vq":
        n, k, d = spec["n"], spec["k"], spec["d"]
        cb = torch.nn.Parameter(torch.randn(n, k, d))

        def run(z):
            x = z.reshape(-1, n, d).transpose(0, 1)
            x, c = (F.normalize(x, dim=-1), F.normalize(cb, dim=-1)) if spec["cosine"] else (x, cb)
            idx = torch.bmm(x, c.transpose(1, 2)).argmax(-1)  # the full (n, N, K) matrix
            q = torch.gather(c, 1, idx.unsqueeze(-1).expand(-1, -1, d))
            out = x + (q - x).detach()
            return out.transpose(0, 1).reshape(z.shape), F.mse_loss(x, q.detach()) * 0.25 + F.mse_loss(q, x.detach())
        run.codebook = cb  # type: ignore[attr-defined]
        return run
    if fn == "rq":
        cbs = torch.nn.Parameter(torch.randn(spec["depth"], spec["k"], spec["d"]))

        def run(z):
            x = z.reshape(-1, spec["d"])
            r, total, loss = x.detach(), 0, 0
            for s in range(spec["depth"]):
                e = cbs[s][torch.cdist(r, cbs[s].detach()).argmin(-1)]  # full (N, K) distances
                loss = loss + F.mse_loss(e, r)
                total, r = total + e, r - e.detach()
            return (x + (total - x).detach()).reshape(z.shape), loss + F.mse_loss(x, total.detach())
        run.codebook = cbs  # type: ignore[attr-defined]
        return run
    if fn in ("lfq", "gq"):
        d = spec["d"]
        codes = corners(d)

        def run(z):
            x = z.reshape(-1, d)  # gq: every (token, group) is a row of one pooled distribution
            q = torch.where(x > 0, 1.0, -1.0)
            h_ps, h_cb = brute_entropies(2 * x @ codes.t() / 0.01)
            return (x + (q - x).detach()).reshape(z.shape), 0.1 * (h_ps - h_cb) + 0.25 * F.mse_loss(x, q)
        return run
    raise ValueError(fn)
