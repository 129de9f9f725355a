"""Binary spherical quantization (BSQ, Zhao et al. 2024, Sec. 3): u = z / ||z||, q = sign(u) / sqrt(d)
(unit norm), straight-through. The projection Linear(z) of the paper is the model's pre-projector.

Soft assignment over the implicit codebook C = {-1/sqrt(d), 1/sqrt(d)}^d:
p(c | u) ∝ exp(2 u.c / T) (the softmax of -||u - c||^2 / T, T = ``entropy_temperature``), which
factorises over bits with p(bit_i = 1) = sigmoid(4 u_i / (T sqrt(d))).
H_ps (per-sample entropy) is EXACT, O(N d). H_cb: ``grouped`` (BSQ eq. 9) sums each group's exact
marginal entropy over its 2^g sub-codes, groups of ``entropy_group_size`` consecutive bits
(g=1: per bit), O(N (d/g) 2^g); ``exact`` is exact over all 2^d codes (half-split GEMM, O(N 2^d) time, O(N 2^(d/2) + 2^d) memory).
``entropy = gamma0 H_ps - gamma H_cb``; paper weights: entropy 0.1 (zeta), commitment 0 (beta in
the released configs). The 3x -> 1x ramp over the first 2k steps is a loss schedule (``quantizer``
loss ``ramp_steps``/``ramp_from``), not part of this module.

Defaults follow BSQ-ViT's released code (zhaoyue-zephyrus/bsq-vit,
``transcoder/models/quantizer/bsq.py``, ``BinarySphericalQuantizer.forward`` and
``soft_entropy_loss``, with ``transcoder/models/bsqvit.py`` ``VITBSQModel``), each with an option:

- ``straight_through: scaled`` -- the sign is straight-through on the unit latent, THEN scaled by
  1/sqrt(d), so the gradient reaching u is 1/sqrt(d) times the incoming one (BSQ-ViT);
  ``identity``: ``sg(q) + u - sg(u)``, gradient passed unchanged (vtok before).
- ``entropy_temperature: 1`` (BSQ-ViT's ``inv_temperature`` 1, ``VITBSQModel``'s default; no released
  config overrides it; T = 1 / inv_temperature); vtok used 0.01.
- ``entropy_scaled_by_temperature: true`` -- the entropy term is multiplied by T, i.e. divided by
  BSQ-ViT's inverse temperature (``zeta * entropy_penalty / inv_temperature`` in ``forward``; a no-op at 1).
- ``commitment_reduction: sum`` -- commitment is ``mean_tokens sum_dims (q - u)^2`` (BSQ-ViT) = d x
  the ``mean`` over dims (vtok before).
BSQ-ViT takes ``log(p + 1e-8)`` inside the entropies; here they are exact (a difference of at most
2^g x 1e-8 nats per group of g bits).

Index convention: BIG-endian by default as BSQ (``index = sum_i 1[u_i > 0] 2^(d-1-i)``).
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
    bit_stats, bits_to_index, code_counts, codebook_entropy_exact, codebook_entropy_grouped, index_to_bits,
    sample_entropy, straight_through,
)

MAX_COUNTED_BITS = 20  # usage over the full 2^d codebook only up to 2^20 codes


class BSQConfig(QuantizerConfig):
    type: Literal["bsq"] = "bsq"
    code_dim: int = Field(18, ge=1, le=62)  # d bits = latent width; implicit codebook 2^d
    bit_order: Literal["little", "big"] = "big"  # index bit weights 2^i (little) or 2^(d-1-i) (big, BSQ)
    entropy_temperature: float = Field(1.0, gt=0)  # T in p(c|u) ∝ exp(2 u.c / T) (BSQ-ViT: inv_temperature 1 = 1 / T)
    entropy_scaled_by_temperature: bool = True  # multiply the entropy term by T (BSQ-ViT: / inv_temperature)
    straight_through: Literal["scaled", "identity"] = "scaled"  # gradient to u: 1/sqrt(d) (BSQ-ViT) or 1
    commitment_reduction: Literal["sum", "mean"] = "sum"  # over the d dims: sum (BSQ-ViT) or mean
    sample_entropy_weight: float = Field(1.0, ge=0)  # gamma0 inside ``entropy``
    codebook_entropy_weight: float = Field(1.0, ge=0)  # gamma inside ``entropy``
    codebook_entropy: Literal["grouped", "exact"] = "grouped"  # see the module docstring
    entropy_group_size: int = Field(9, ge=1)  # bits per group for codebook_entropy=grouped (up to code_dim, <= 24)
    commitment_weight: float = Field(0.0, ge=0)  # beta, paper weight of mse(u, sg(q)) (0 in released configs)
    entropy_weight: float = Field(0.1, ge=0)  # zeta, paper weight of the entropy term

    @property
    def latent_dim(self) -> int:
        return self.code_dim

    @model_validator(mode="after")
    def _check(self) -> "BSQConfig":
        if self.codebook_entropy == "grouped" and self.code_dim % self.entropy_group_size:
            raise ValueError(f"entropy_group_size {self.entropy_group_size} does not divide code_dim {self.code_dim}")
        if self.codebook_entropy == "grouped" and self.entropy_group_size > 24:
            g = self.entropy_group_size
            raise ValueError(f"entropy_group_size {g} holds 2^{g} probabilities per group; at most 24")
        if self.codebook_entropy == "exact" and self.code_dim > 24:
            raise ValueError(f"codebook_entropy=exact holds 2^{self.code_dim} probabilities; use 'grouped' above 24 bits")
        return self


class BSQ(Quantizer):
    """Binary spherical quantization: l2-normalise, sign / sqrt(d), exact per-sample + grouped codebook entropy."""

    Config = BSQConfig

    def __init__(self, cfg: BSQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.scale = cfg.code_dim**-0.5
        self.codes_per_token = 1
        self.codebook_sizes = [2**cfg.code_dim]
        self.bits_per_token = float(cfg.code_dim)

    def quantize(self, z: Tensor) -> QuantizerOutput:
        cfg = self.cfg
        u = F.normalize(z.reshape(-1, cfg.code_dim), dim=-1)
        bits = u > 0
        q = torch.where(bits, self.scale, -self.scale)
        a = u * (4 / cfg.entropy_temperature * self.scale)  # per-bit logit of p(c | u)
        h_ps = sample_entropy(a)
        h_cb = (codebook_entropy_grouped(a, cfg.entropy_group_size) if cfg.codebook_entropy == "grouped"
                else codebook_entropy_exact(a))
        entropy = cfg.sample_entropy_weight * h_ps - cfg.codebook_entropy_weight * h_cb
        if cfg.entropy_scaled_by_temperature:
            entropy = entropy * cfg.entropy_temperature
        commitment = (q - u).pow(2).sum(-1).mean() if cfg.commitment_reduction == "sum" else F.mse_loss(u, q)
        losses = {"commitment": commitment, "entropy": entropy}
        idx = bits_to_index(bits, cfg.bit_order)
        metrics = {"sample_entropy": h_ps.detach(), "codebook_entropy": h_cb.detach()}
        stats = bit_stats(bits)
        if cfg.code_dim <= MAX_COUNTED_BITS:
            stats["counts"] = code_counts(idx[:, None], 2**cfg.code_dim)
        out = straight_through(u, q, self.scale if cfg.straight_through == "scaled" else 1.0)
        return QuantizerOutput(out.reshape(z.shape), idx.reshape(*z.shape[:-1], 1), losses, metrics, stats)

    def lookup(self, z: Tensor) -> Tensor:
        bits = F.normalize(z.reshape(-1, self.cfg.code_dim), dim=-1) > 0
        return bits_to_index(bits, self.cfg.bit_order).reshape(*z.shape[:-1], 1)

    def loss_weights(self) -> dict[str, float]:
        return {"commitment": self.cfg.commitment_weight, "entropy": self.cfg.entropy_weight}

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        bits = index_to_bits(indices[..., 0], self.cfg.code_dim, self.cfg.bit_order)
        return torch.where(bits, self.scale, -self.scale)

    def index_radices(self) -> list[list[int]]:
        return [[2] * self.cfg.code_dim]


@hookimpl
def register_quantizers(register):
    register("bsq", BSQ)
