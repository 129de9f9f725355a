"""No quantization: the continuous baseline (UniTok roadmap's "CLIP" and "+factorization" bars,
and continuous teachers for distillation)."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from core.hookspecs import hookimpl
from core.interfaces import Quantizer, QuantizerConfig, QuantizerOutput


class IdentityConfig(QuantizerConfig):
    type: Literal["identity"] = "identity"
    renamed = {"dim": "code_dim"}
    code_dim: int = Field(64, gt=0)  # latent width passed through unchanged

    @property
    def latent_dim(self) -> int:
        return self.code_dim


class Identity(Quantizer):
    """Pass-through "quantizer": ``quantized = z``, no losses, no codes (indices ``(B, N, 0)``).

    It is continuous: ``codes_per_token = 0`` and there is no discrete path, so
    ``indices_to_codes`` raises; ``bits_per_token`` states the fp32 storage (32 per channel).
    """

    Config = IdentityConfig
    continuous = True  # contract tests and evaluators that need a discrete path skip it

    def __init__(self, cfg: IdentityConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.codes_per_token = 0
        self.codebook_sizes = []
        self.bits_per_token = 32.0 * cfg.code_dim

    def quantize(self, z: Tensor) -> QuantizerOutput:
        return QuantizerOutput(z, self.lookup(z))

    def lookup(self, z: Tensor) -> Tensor:
        return z.new_zeros((*z.shape[:-1], 0), dtype=torch.int64)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        raise RuntimeError("the identity quantizer is continuous: it has no discrete codes (use model.discrete_latent)")


@hookimpl
def register_quantizers(register):
    register("identity", Identity)
