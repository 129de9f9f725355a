"""Lookup-free quantization: ``lfq`` (MAGVIT-v2 / Open-MAGVIT2) and ``gq`` (WeTok group-wise LFQ).

LFQ (Yu et al. 2023, Sec. 3.1): q_i = sign(z_i) in {-1, +1}, straight-through; the implicit
codebook is {-1, 1}^d (2^d codes). Index convention: LITTLE-endian by default,
``index = sum_i 1[z_i > 0] 2^i`` (Open-MAGVIT2); ``bit_order: big`` gives ``2^(d-1-i)``.
Entropy loss (eq. 5): p(c | z) = softmax_c(2 z.c / T), H_ps = mean_tokens H(p(.|z)),
H_cb = H(mean_tokens p(.|z)) over the LOCAL batch (as the source; no all-reduce),
``entropy = gamma0 H_ps - gamma H_cb`` (paper weight 0.1); ``commitment`` = mse(z, sg(q)) (0.25).

Cost: p(.|z) factorises over bits (p(bit_i = 1) = sigmoid(4 z_i / T)), so H_ps is EXACT in
O(N d) (sum of bit entropies). H_cb: ``exact`` is the exact value without N x 2^d: split the bits
in two halves, p = p_lo p_hi, so mean_tokens p = HI^T LO / N, one GEMM (O(N 2^d) time, O(N 2^(d/2)
+ 2^d) memory, fine up to 24 bits); ``grouped`` is the BSQ group-factorised estimate (sum over
groups of ``entropy_group_size`` bits of each group's exact marginal entropy, O(N (d/g) 2^g), an
upper bound of H_cb); ``none`` drops the H_cb term.

GQ (WeTok): channels split into g groups of d' bits, group k = channels [k d', (k+1) d'); each is
an LFQ with 2^d' codes (UniWeTok: 16 x 8 -> 2^128). Per-group entropies are exact over 2^d' (O(N g 2^d') by the same half-split GEMM).
Both ``codebook_entropy`` modes measure entropy PER GROUP CODE (nats, at most d' ln 2) with the
same per-sample term H_ps = mean over groups of H_ps_k, so switching the mode does not rescale
the loss: ``pooled`` (WeTok, ``GFQ.forward`` -> ``entropy_loss`` averaging probabilities over
``... D -> D``) treats every (token, group) as a sample of ONE shared 2^d' distribution,
entropy = gamma0 mean_k H_ps_k - gamma H(mean over tokens and groups of p);
``per_group`` gives each group its own distribution, entropy = mean_k (gamma0 H_ps_k - gamma H_cb_k),
i.e. g independent LFQ terms averaged (their SUM, the BSQ-style factorised entropy of the whole
g d'-bit code, is g times this: scale ``entropy_weight`` by g to train with the sum).
H(mean_k p_k) >= mean_k H(p_k), so ``pooled`` H_cb is the larger of the two on the same latents.

Codebook-entropy logarithm (``codebook_entropy_log_eps``): 0 (default) is exact; Open-MAGVIT2
(TencentARC/SEED-Voken ``src/Open_MAGVIT2/modules/vqvae/lookup_free_quantize.py``,
``entropy_loss``) and WeTok (same function in ``src/WeTok/modules/vqvae/lookup_free_quantize.py``)
take ``log(avg_probs + 1e-5)``: set 1e-5 for a literal reproduction. Their per-sample entropy
(``log_softmax(logits / T + eps)``) is exact, as here. Open-MAGVIT2's ``codebook_enlarge`` ramp
multiplies only the entropy term: ``quantizer`` loss ``ramp_terms: [entropy]``.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from core.hookspecs import hookimpl
from core.interfaces import Quantizer, QuantizerConfig, QuantizerOutput
from plugins.quantizers._common import (
    bit_entropy, bit_stats, bits_to_index, code_counts, code_distribution, codebook_entropy_exact,
    codebook_entropy_grouped, entropy, index_to_bits, sample_entropy, straight_through,
)

#: usage over the full implicit codebook is counted only up to this many bits (2^20 floats = 4 MB)
MAX_COUNTED_BITS = 20


class _BinaryConfig(QuantizerConfig):
    bit_order: Literal["little", "big"] = "little"  # index = sum_i b_i 2^i (little) or 2^(d-1-i) (big)
    entropy_temperature: float = Field(0.01, gt=0)  # T in softmax(2 z.c / T)
    sample_entropy_weight: float = Field(1.0, ge=0)  # gamma0: weight of the per-sample entropy inside ``entropy``
    codebook_entropy_weight: float = Field(1.0, ge=0)  # gamma: weight of the codebook entropy inside ``entropy``
    commitment_weight: float = Field(0.25, ge=0)  # paper weight of the commitment term
    entropy_weight: float = Field(0.1, ge=0)  # paper weight of the entropy term
    codebook_entropy_log_eps: float = Field(0.0, ge=0)  # 0: exact H_cb; 1e-5: log(p + 1e-5) (Open-MAGVIT2, WeTok)


class LFQConfig(_BinaryConfig):
    type: Literal["lfq"] = "lfq"
    code_dim: int = Field(18, ge=1, le=62)  # d bits = latent width; implicit codebook 2^d
    codebook_entropy: Literal["exact", "grouped", "none"] = "exact"  # see the module docstring
    entropy_group_size: int = Field(8, ge=1, le=16)  # bits per group for codebook_entropy=grouped

    @property
    def latent_dim(self) -> int:
        return self.code_dim

    @model_validator(mode="after")
    def _check(self) -> "LFQConfig":
        if self.codebook_entropy == "exact" and self.code_dim > 24:
            raise ValueError(f"codebook_entropy=exact holds 2^{self.code_dim} probabilities; use 'grouped' above 24 bits")
        if self.codebook_entropy == "grouped" and self.code_dim % self.entropy_group_size:
            raise ValueError(f"entropy_group_size {self.entropy_group_size} does not divide code_dim {self.code_dim}")
        return self


class GQConfig(_BinaryConfig):
    type: Literal["gq"] = "gq"
    codes_per_token: int = Field(16, ge=1)  # g groups
    code_dim: int = Field(8, ge=1, le=16)  # d' bits per group; each group has 2^d' implicit codes
    codebook_entropy: Literal["pooled", "per_group"] = "pooled"  # one shared distribution (WeTok) or one per group

    @property
    def latent_dim(self) -> int:
        return self.codes_per_token * self.code_dim


def _signs(x: Tensor) -> tuple[Tensor, Tensor]:
    """bits (x > 0) and the codes +-1 (sign with sign(0) = -1, so every code is a corner)."""
    bits = x > 0
    return bits, torch.where(bits, 1.0, -1.0)


class LFQ(Quantizer):
    """Lookup-free quantization: sign per channel, implicit 2^d codebook, entropy + commitment losses."""

    Config = LFQConfig

    def __init__(self, cfg: LFQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.codes_per_token = 1
        self.codebook_sizes = [2**cfg.code_dim]
        self.bits_per_token = float(cfg.code_dim)

    def codebook_entropy(self, a: Tensor) -> Tensor:
        cfg = self.cfg
        if cfg.codebook_entropy == "exact":
            return codebook_entropy_exact(a, cfg.codebook_entropy_log_eps)
        if cfg.codebook_entropy == "grouped":
            return codebook_entropy_grouped(a, cfg.entropy_group_size, log_eps=cfg.codebook_entropy_log_eps)
        return a.new_zeros(())

    def quantize(self, z: Tensor) -> QuantizerOutput:
        cfg = self.cfg
        x = z.reshape(-1, cfg.code_dim)
        bits, q = _signs(x)
        a = x * (4 / cfg.entropy_temperature)  # per-bit logit of p(c | z)
        h_ps, h_cb = sample_entropy(a), self.codebook_entropy(a)
        losses = {"commitment": F.mse_loss(x, q),
                  "entropy": cfg.sample_entropy_weight * h_ps - cfg.codebook_entropy_weight * h_cb}
        idx = bits_to_index(bits, cfg.bit_order)
        metrics = {"sample_entropy": h_ps.detach(), "codebook_entropy": h_cb.detach()}
        stats = bit_stats(bits)
        if cfg.code_dim <= MAX_COUNTED_BITS:
            stats["counts"] = code_counts(idx[:, None], 2**cfg.code_dim)
        return QuantizerOutput(straight_through(x, q).reshape(z.shape), idx.reshape(*z.shape[:-1], 1), losses, metrics,
                               stats)

    def lookup(self, z: Tensor) -> Tensor:
        return bits_to_index(z.reshape(-1, self.cfg.code_dim) > 0, self.cfg.bit_order).reshape(*z.shape[:-1], 1)

    def loss_weights(self) -> dict[str, float]:
        return {"commitment": self.cfg.commitment_weight, "entropy": self.cfg.entropy_weight}

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        return torch.where(index_to_bits(indices[..., 0], self.cfg.code_dim, self.cfg.bit_order), 1.0, -1.0)

    def index_radices(self) -> list[list[int]]:
        return [[2] * self.cfg.code_dim]


class GQ(Quantizer):
    """WeTok group-wise LFQ: g groups of d' sign bits, exact per-group entropies, pooled or per group."""

    Config = GQConfig

    def __init__(self, cfg: GQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.codes_per_token = cfg.codes_per_token
        self.codebook_sizes = [2**cfg.code_dim] * cfg.codes_per_token
        self.bits_per_token = float(cfg.codes_per_token * cfg.code_dim)

    def entropies(self, a: Tensor) -> tuple[Tensor, Tensor]:
        """a ``(M, g, d')`` -> (H_ps, H_cb) per group code, as ``codebook_entropy`` says."""
        h_ps = bit_entropy(a).sum(-1).mean(0).mean()  # exact per group, averaged over groups (both modes)
        eps = self.cfg.codebook_entropy_log_eps
        if self.cfg.codebook_entropy == "pooled":
            return h_ps, entropy(code_distribution(a, pool_groups=True), eps)
        return h_ps, entropy(code_distribution(a), eps).mean()  # (g, 2^d') exact per-group means

    def quantize(self, z: Tensor) -> QuantizerOutput:
        cfg = self.cfg
        x = z.reshape(-1, cfg.codes_per_token, cfg.code_dim)
        bits, q = _signs(x)
        h_ps, h_cb = self.entropies(x * (4 / cfg.entropy_temperature))
        losses = {"commitment": F.mse_loss(x, q),
                  "entropy": cfg.sample_entropy_weight * h_ps - cfg.codebook_entropy_weight * h_cb}
        idx = bits_to_index(bits, cfg.bit_order)  # (M, g)
        metrics = {"sample_entropy": h_ps.detach(), "codebook_entropy": h_cb.detach()}
        stats = {**bit_stats(bits.reshape(x.shape[0], -1)), "counts": code_counts(idx, 2**cfg.code_dim)}
        out = straight_through(x, q).reshape(z.shape)
        return QuantizerOutput(out, idx.reshape(*z.shape[:-1], cfg.codes_per_token), losses, metrics, stats)

    def lookup(self, z: Tensor) -> Tensor:
        bits = z.reshape(-1, self.cfg.codes_per_token, self.cfg.code_dim) > 0
        return bits_to_index(bits, self.cfg.bit_order).reshape(*z.shape[:-1], self.cfg.codes_per_token)

    def loss_weights(self) -> dict[str, float]:
        return {"commitment": self.cfg.commitment_weight, "entropy": self.cfg.entropy_weight}

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        q = torch.where(index_to_bits(indices, self.cfg.code_dim, self.cfg.bit_order), 1.0, -1.0)
        return q.reshape(*indices.shape[:-1], self.cfg.latent_dim)

    def index_radices(self) -> list[list[int]]:
        return [[2] * self.cfg.code_dim for _ in range(self.cfg.codes_per_token)]


@hookimpl
def register_quantizers(register):
    register("lfq", LFQ)
    register("gq", GQ)
