"""Vector quantization with one codebook (minimal foundation version; see issue 3 for the full one)."""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from core.hookspecs import hookimpl
from core.interfaces import Quantizer, QuantizerConfig, QuantizerOutput


class VQConfig(QuantizerConfig):
    type: Literal["vq"] = "vq"
    codebook_size: int = Field(1024, gt=1)  # entries in the codebook
    code_dim: int = Field(16, gt=0)  # width of each code (= the latent width quantized)
    commitment: float = Field(0.25, ge=0)  # beta in 0.25*mse(z, sg(q)); the codebook term has weight 1

    @property
    def latent_dim(self) -> int:
        return self.code_dim


class VQ(Quantizer):
    """Single-codebook VQ: l2-normalised cosine lookup, straight-through, commitment + codebook losses."""

    Config = VQConfig

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        bound = cfg.code_dim**-0.5 / 36  # UniTok's codebook init
        self.codebook = nn.Parameter(torch.empty(cfg.codebook_size, cfg.code_dim).uniform_(-bound, bound))
        self.codes_per_token = 1
        self.codebook_sizes = [cfg.codebook_size]
        self.bits_per_token = math.log2(cfg.codebook_size)

    def quantize(self, z: Tensor) -> QuantizerOutput:
        zn = F.normalize(z, dim=-1)
        cb = F.normalize(self.codebook, dim=-1)
        idx = (zn.reshape(-1, zn.shape[-1]) @ cb.t()).argmax(dim=-1)
        q = cb[idx].view_as(zn)
        losses = {"commitment": F.mse_loss(zn, q.detach()), "codebook": F.mse_loss(q, zn.detach())}
        counts = torch.bincount(idx, minlength=self.cfg.codebook_size).float()
        p = counts / counts.sum()
        metrics = {
            "usage": (p > 0.01 / self.cfg.codebook_size).float().mean().detach() * 100,
            "perplexity": torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()).detach(),
        }
        return QuantizerOutput(zn + (q - zn).detach(), idx.view(*z.shape[:-1], 1), losses, metrics)

    def loss_weights(self) -> dict[str, float]:
        return {"commitment": self.cfg.commitment, "codebook": 1.0}

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        return F.normalize(self.codebook, dim=-1)[indices[..., 0]]


@hookimpl
def register_quantizers(register):
    register("vq", VQ)
