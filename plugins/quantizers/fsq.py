"""Finite scalar quantization (FSQ, Mentzer et al. 2023, Sec. 3): each channel i is bounded to
L_i levels and rounded; no codebook, no auxiliary loss (the baseline without entropy or VQ terms).

Bounding (paper, App. A.1, ``FSQ.bound``): f(z) = tanh(z + shift) * h - offset with
h = (L - 1)(1 - eps)/2, eps = 1e-3, offset = 0.5 for even L (0 for odd); then round with
straight-through and divide by floor(L/2), so codes lie in [-1, 1]. f's range
(-h - offset, h - offset) rounds to exactly the L integers -floor(L/2) .. ceil(L/2) - 1.

``shift`` (even L only; 0 for odd L) moves z = 0 towards code 0:

- ``tan`` (default): shift = tan(offset / h), what the paper's reference code computes. Defined for
  every L >= 2; for L = 2 (codes -1, 0) z = 0 lands inside code 0, with the boundary at z = -shift.
- ``atanh``: shift = atanh(offset / h), so that f(0) = 0 exactly (the variant
  vector-quantize-pytorch's ``FSQ.bound`` uses, there with h = (L - 1)(1 + eps)/2). For L = 2,
  offset / h > 1 and atanh is undefined: rejected with a config error. For L >= 4 the two agree
  to 3e-4 in the shift.

Index convention: mixed radix, channel 0 least significant:
``index = sum_i digit_i prod_{j<i} L_j`` with ``digit_i = round(f(z_i)) + floor(L_i/2)``.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor

from core.hookspecs import hookimpl
from core.interfaces import Quantizer, QuantizerConfig, QuantizerOutput
from plugins.quantizers._common import code_counts, straight_through

MAX_COUNTED_CODES = 1 << 20  # usage over the implicit codebook only up to 2^20 codes


class FSQConfig(QuantizerConfig):
    type: Literal["fsq"] = "fsq"
    levels: list[int] = Field(default_factory=lambda: [8, 5, 5, 5])  # L_i per channel; codebook prod(L_i)
    shift: Literal["tan", "atanh"] = "tan"  # even-L shift: the paper's code (tan) or f(0) = 0 exactly (atanh)

    @field_validator("levels")
    @classmethod
    def _check(cls, v: list[int]) -> list[int]:
        if not v or min(v) < 2:
            raise ValueError("levels must be a non-empty list of integers >= 2")
        if math.prod(v) >= 2**62:
            raise ValueError("prod(levels) must stay below 2^62 (int64 indices)")
        return v

    @model_validator(mode="after")
    def _check_shift(self) -> "FSQConfig":
        if self.shift == "atanh" and 2 in self.levels:
            raise ValueError("a level of 2 needs shift: tan (atanh(offset / half-width) is undefined for L = 2)")
        return self

    @property
    def latent_dim(self) -> int:
        return len(self.levels)


class FSQ(Quantizer):
    """Finite scalar quantization: bounded tanh, round with straight-through, mixed-radix index."""

    Config = FSQConfig

    def __init__(self, cfg: FSQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        levels = torch.tensor(cfg.levels, dtype=torch.float32)
        half = (levels - 1) * (1 - 1e-3) / 2
        offset = torch.where(levels % 2 == 0, 0.5, 0.0)
        self.register_buffer("half_range", half, persistent=False)
        self.register_buffer("offset", offset, persistent=False)
        shift = torch.tan(offset / half) if cfg.shift == "tan" else torch.atanh(offset / half)
        self.register_buffer("shift", shift, persistent=False)
        self.register_buffer("width", torch.floor(levels / 2), persistent=False)
        radix = [math.prod(cfg.levels[:i]) for i in range(len(cfg.levels))]
        self.register_buffer("radix", torch.tensor(radix, dtype=torch.long), persistent=False)
        self.codes_per_token = 1
        self.codebook_sizes = [math.prod(cfg.levels)]
        self.bits_per_token = sum(math.log2(n) for n in cfg.levels)

    def _bound(self, z: Tensor) -> Tensor:
        return torch.tanh(z + self.shift) * self.half_range - self.offset

    def _index(self, bounded: Tensor) -> Tensor:
        digits = (torch.round(bounded).long() + self.width.long())
        return (digits * self.radix).sum(-1, keepdim=True)

    def lookup(self, z: Tensor) -> Tensor:
        return self._index(self._bound(z))

    def quantize(self, z: Tensor) -> QuantizerOutput:
        bounded = self._bound(z)
        rounded = straight_through(bounded, torch.round(bounded))
        idx = self._index(bounded)
        stats = {}
        if self.codebook_sizes[0] <= MAX_COUNTED_CODES:
            stats["counts"] = code_counts(idx.reshape(-1, 1), self.codebook_sizes[0])
        return QuantizerOutput(rounded / self.width, idx, {}, {}, stats)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        levels = torch.tensor(self.cfg.levels, device=indices.device)
        digits = (indices // self.radix) % levels  # indices (..., 1) broadcast over channels
        return (digits - self.width.long()).float() / self.width

    def index_radices(self) -> list[list[int]]:
        return [list(self.cfg.levels)]


@hookimpl
def register_quantizers(register):
    register("fsq", FSQ)
