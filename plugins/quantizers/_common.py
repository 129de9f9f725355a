"""Helpers the quantizer plugins share: straight-through, chunked nearest-code search, k-means,
code-usage statistics and the exact bit-factorised entropies of the lookup-free family.

Written by hand because no installed library offers them with the memory bounds vtok needs:
vector-quantize-pytorch materialises the full N x K distance matrix and, for LFQ, the N x 2^d
probability matrix (see ``python -m core.bench quantizers``).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor

from core.dist import broadcast_
from core.quant_stats import bit_stats, code_counts, usage_metrics  # noqa: F401  (re-exported)

#: default bound on the elements of one (rows x codes) similarity block: 2^18 floats = 1 MB (stays in L2)
SEARCH_BUDGET = 1 << 18


def straight_through(z: Tensor, q: Tensor, scale: float = 1.0) -> Tensor:
    """Value exactly ``q`` (bit for bit), gradient ``scale`` times the identity to ``z``:
    ``sg(q) + scale (z - sg(z))``.

    Equivalent to the usual ``z + sg(q - z)`` (times ``scale``) but without its rounding error, so
    ``indices_to_codes`` reproduces ``quantized`` exactly.
    """
    return q.detach() + (z - z.detach()) * scale if scale != 1.0 else q.detach() + (z - z.detach())


# ----------------------------------------------------------------------------------------------
# nearest-code search and k-means
# ----------------------------------------------------------------------------------------------


def argmax_last(sim: Tensor, block: int = 32) -> Tensor:
    """``sim.argmax(-1)``, same result (first maximum on ties), ~3x faster on CPU for long rows.

    torch's CPU argmax is a scalar loop while ``amax`` is vectorised: take the first block of
    ``block`` codes whose maximum is the row maximum (amax per block, argmax over K/block), then
    the first maximum inside that block.
    """
    k = sim.shape[-1]
    if k % block or k < 16 * block:
        return sim.argmax(-1)
    blocks = sim.unflatten(-1, (k // block, block))
    best = blocks.amax(-1).argmax(-1)
    inner = torch.gather(blocks, -2, best[..., None, None].expand(*best.shape, 1, block)).squeeze(-2).argmax(-1)
    return best * block + inner


@torch.no_grad()
def nearest_code(x: Tensor, codebook: Tensor, metric: str, budget: int = SEARCH_BUDGET) -> Tensor:
    """Index of the nearest code for every row, per sub-codebook, without the full N x K matrix.

    x: ``(n, M, d)``, codebook: ``(n, K, d)`` -> int64 ``(n, M)``. ``metric``: ``"dot"`` (argmax x.c,
    i.e. cosine when both sides are l2-normalised) or ``"euclidean"`` (argmin ||x - c||^2 =
    argmax x.c - ||c||^2/2). Rows are processed in chunks of ``budget // (n K)`` so memory is
    O(n M d + n K d + chunk n K).
    """
    n, m, _ = x.shape
    k = codebook.shape[1]
    cb_t = codebook.transpose(1, 2)
    bias = (-0.5 * codebook.pow(2).sum(-1)).unsqueeze(1) if metric == "euclidean" else None
    rows = max(1, budget // (n * k))
    out = torch.empty(n, m, dtype=torch.long, device=x.device)
    for s in range(0, m, rows):
        xs = x[:, s : s + rows]
        sim = torch.baddbmm(bias, xs, cb_t) if bias is not None else torch.bmm(xs, cb_t)
        out[:, s : s + rows] = argmax_last(sim)
    return out


def gather_codes(codebook: Tensor, idx: Tensor) -> Tensor:
    """codebook ``(n, K, d)``, idx ``(n, M)`` -> codes ``(n, M, d)`` (differentiable in the codebook)."""
    return torch.gather(codebook, 1, idx.unsqueeze(-1).expand(-1, -1, codebook.shape[-1]))


@torch.no_grad()
def cluster_sums(x: Tensor, idx: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per-code sums ``(n, K, d)`` and counts ``(n, K)`` of the rows assigned to each code."""
    n, _, d = x.shape
    sums = x.new_zeros(n, k, d).scatter_add_(1, idx.unsqueeze(-1).expand(-1, -1, d), x)
    counts = x.new_zeros(n, k).scatter_add_(1, idx, torch.ones_like(idx, dtype=x.dtype))
    return sums, counts


@torch.no_grad()
def kmeans(x: Tensor, k: int, iters: int, metric: str, budget: int = SEARCH_BUDGET) -> Tensor:
    """Lloyd's k-means per sub-codebook, vectorised over the n sub-codebooks. x ``(n, M, d)``.

    Starts from k random rows (with replacement when M < k). ``metric="dot"`` re-normalises the
    centroids (spherical k-means). An empty cluster keeps its previous centroid. Every iteration
    ends with the centroid update, so each cluster's squared error is at most that of the zero
    vector (the mean minimises it) -- what makes residual quantization's error non-increasing.
    The result is broadcast from rank 0 under torch.distributed.
    """
    n, m, _ = x.shape
    c = gather_codes(x, torch.randint(m, (n, k), device=x.device))
    for _ in range(iters):
        sums, counts = cluster_sums(x, nearest_code(x, c, metric, budget), k)
        new = sums / counts.clamp_min(1).unsqueeze(-1)
        new = F.normalize(new, dim=-1) if metric == "dot" else new
        c = torch.where(counts.unsqueeze(-1) > 0, new, c)
    return broadcast_(c.contiguous())


# ----------------------------------------------------------------------------------------------
# usage statistics: LOCAL sum-reducible counts; core.quant_stats derives usage etc. from them
# ----------------------------------------------------------------------------------------------
#   code_counts (M, n) -> (n, K), bit_stats (M, d) -> {bit_sums, rows}; usage_metrics for direct use


# ----------------------------------------------------------------------------------------------
# bits <-> indices
# ----------------------------------------------------------------------------------------------


def bit_weights(nbits: int, order: str, device=None) -> Tensor:
    """2^i for bit i (little-endian: bit 0 is the least significant) or 2^(d-1-i) (big-endian)."""
    w = 2 ** torch.arange(nbits, device=device, dtype=torch.long)
    return w if order == "little" else w.flip(0)


def bits_to_index(bits: Tensor, order: str) -> Tensor:
    """bool ``(..., d)`` -> int64 ``(...)``."""
    return (bits.long() * bit_weights(bits.shape[-1], order, bits.device)).sum(-1)


def index_to_bits(idx: Tensor, nbits: int, order: str) -> Tensor:
    """int64 ``(...)`` -> bool ``(..., d)``."""
    return (idx.unsqueeze(-1) & bit_weights(nbits, order, idx.device)) != 0


def all_bits(nbits: int, device=None, start: int = 0, stop: int | None = None) -> Tensor:
    """float ``(K, nbits)`` 0/1 patterns of codes ``start..stop`` (little-endian)."""
    codes = torch.arange(start, stop if stop is not None else 2**nbits, device=device)
    return index_to_bits(codes, nbits, "little").float()


# ----------------------------------------------------------------------------------------------
# entropies of the lookup-free family
#
# Every LFQ-style soft assignment is a softmax over the implicit codebook of logits linear in the
# code's bits b in {0,1}^d: p(b | a) ∝ exp(a . b) with a per-bit logit a (LFQ: a = 4 z / T since
# 2 z.c / T = 4 z.b / T + const for c = 2b - 1). It factorises over bits: p(b_i = 1) = sigmoid(a_i).
# ----------------------------------------------------------------------------------------------


def bit_entropy(a: Tensor) -> Tensor:
    """Entropy (nats) of Bernoulli(sigmoid(a)), elementwise, stable for large |a|."""
    p = torch.sigmoid(a)
    return p * F.softplus(-a) + (1 - p) * F.softplus(a)


def sample_entropy(a: Tensor) -> Tensor:
    """EXACT mean over rows of H(p(. | a_row)) over the whole 2^d codebook, in O(M d).

    a ``(M, d)``; the entropy of a product distribution is the sum of the bit entropies.
    """
    return bit_entropy(a).sum(-1).mean()


def group_probs(a: Tensor) -> Tensor:
    """a ``(..., g)`` -> exact distribution of the 2^g sub-codes ``(..., 2^g)`` (little-endian index).
    Memory O(2^g) per row: use only for small g (see :func:`code_distribution`)."""
    return torch.softmax(a @ all_bits(a.shape[-1], a.device).t(), dim=-1)


def entropy(p: Tensor, log_eps: float = 0.0) -> Tensor:
    """Entropy (nats) over the last axis; probabilities that underflowed to 0 add 0 (finite gradient).

    ``log_eps > 0``: ``-sum p log(p + log_eps)`` instead, the form of Open-MAGVIT2 / WeTok's
    ``entropy_loss`` (``log(avg_probs + 1e-5)``) and UniTok's ``get_entropy_loss`` (1e-7).
    """
    if log_eps > 0:
        return -(p * (p + log_eps).log()).sum(-1)
    return -(p * p.clamp_min(1e-30).log()).sum(-1)


def code_distribution(a: Tensor, pool_groups: bool = False) -> Tensor:
    """EXACT mean over rows of p(. | a_row) over all 2^g codes of each group, without M x 2^g.

    a ``(M, G, g)`` -> ``(G, 2^g)`` (``(2^g,)`` with ``pool_groups``: also averaged over groups).
    Split each group's bits into a low half (h = g // 2 bits) and a high half; p factorises as
    p(c) = p_lo(c_lo) p_hi(c_hi), so mean_rows p(c) = (HI^T LO)[c_hi, c_lo] / M, one GEMM with
    inner size M. Memory O(M G (2^h + 2^(g-h)) + G 2^g), time O(M G 2^g) in a BLAS matmul.
    """
    m, groups, g = a.shape
    h = g // 2
    lo, hi = group_probs(a[..., :h]), group_probs(a[..., h:])  # (M, G, 2^h), (M, G, 2^(g-h))
    if pool_groups:
        return (hi.reshape(m * groups, -1).t() @ lo.reshape(m * groups, -1)).reshape(-1) / (m * groups)
    joint = torch.bmm(hi.permute(1, 2, 0), lo.transpose(0, 1)) / m  # (G, 2^(g-h), 2^h)
    return joint.reshape(groups, -1)  # index c_hi 2^h + c_lo = little-endian code index


def codebook_entropy_exact(a: Tensor, log_eps: float = 0.0) -> Tensor:
    """EXACT H(mean over rows of p(. | a_row)) over all 2^d codes; a ``(M, d)``.

    Via :func:`code_distribution` with one group: O(M 2^(d/2) + 2^d) memory, one GEMM.
    ``log_eps``: see :func:`entropy`.
    """
    return entropy(code_distribution(a[:, None, :])[0], log_eps)


def codebook_entropy_grouped(a: Tensor, group: int, pooled: bool = False, log_eps: float = 0.0) -> Tensor:
    """Group-factorised codebook entropy from a ``(M, d)``, groups of ``group`` consecutive bits.

    ``pooled=False`` (BSQ): sum over groups of H(mean_rows p_group) -- exact per group, an UPPER
    bound of the exact codebook entropy (equal when groups are independent); group=1 is per-bit.
    ``pooled=True`` (WeTok): H of the single 2^g distribution averaged over rows AND groups.
    """
    m, d = a.shape
    dist = code_distribution(a.view(m, d // group, group), pool_groups=pooled)
    return entropy(dist, log_eps) if pooled else entropy(dist, log_eps).sum()
