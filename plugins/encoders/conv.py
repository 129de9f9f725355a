"""VQGAN-style convolutional encoder (residual blocks, stride-2 downsampling).

The CNN backbone of UniWeTok's Table 7 and the usual VQGAN encoder: per stage residual blocks then
a stride-2 conv, so the total stride is ``downsample`` (a power of two, 4-32 in the papers). With
``double_bottleneck`` the last downsampling conv doubles the channels and the bottleneck (middle
block and output) runs at twice the width: UniWeTok's "double bottleneck channel" (Table 4).
"""
from __future__ import annotations

import math
from typing import Literal, Optional

from pydantic import Field, model_validator
from torch import Tensor, nn

from core.hookspecs import hookimpl
from core.interfaces import Encoder, EncoderConfig
from plugins.final_activation import FinalActivation, make_final_activation


def norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, ch // 4) or 1, ch, eps=1e-6)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv twice with a (1x1 when the width changes) skip."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.body = nn.Sequential(norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1),
                                  norm(c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.body(x)


def tokens_from_map(x: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """``(B, C, h, w)`` -> tokens ``(B, h*w, C)`` (row-major) and the grid ``(h, w)``."""
    h, w = x.shape[-2:]
    return x.flatten(2).transpose(1, 2), (h, w)


def map_from_tokens(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """Inverse of :func:`tokens_from_map`."""
    b, _, c = tokens.shape
    return tokens.transpose(1, 2).reshape(b, c, *grid)


def log2_exact(n: int) -> int:
    """log2 of a power of two (callers validate that it is one)."""
    return int(math.log2(n))


class ConvConfig(EncoderConfig):
    type: Literal["conv"] = "conv"
    width: int = Field(64, gt=0)  # channels after the stem
    downsample: int = Field(4, ge=1)  # total stride, a power of two
    channel_mult: Optional[list[int]] = None  # width multiplier per downsampling stage (default all 1)
    num_res_blocks: int = Field(1, ge=0)  # residual blocks per stage
    double_bottleneck: bool = False  # last downsampling conv doubles the channels (UniWeTok Table 4)
    final_activation: FinalActivation = "none"  # last op on the tokens: none | siglu | tanh

    @model_validator(mode="after")
    def _check(self) -> "ConvConfig":
        if self.downsample & (self.downsample - 1):
            raise ValueError(f"downsample must be a power of two, got {self.downsample}")
        stages = log2_exact(self.downsample)
        if self.channel_mult is not None and len(self.channel_mult) != stages:
            raise ValueError(f"channel_mult needs {stages} entries (one per downsampling stage), got {len(self.channel_mult)}")
        if self.double_bottleneck and stages == 0:
            raise ValueError("double_bottleneck needs at least one downsampling stage (downsample >= 2)")
        return self

    def mults(self) -> list[int]:
        return self.channel_mult or [1] * log2_exact(self.downsample)


class ConvEncoder(Encoder):
    """Conv stem, then per stage: residual blocks + stride-2 conv; GroupNorm-SiLU-1x1 conv to out_dim."""

    Config = ConvConfig

    def __init__(self, cfg: ConvConfig, image_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.downsample = cfg.downsample
        layers: list[nn.Module] = [nn.Conv2d(3, cfg.width, 3, padding=1)]
        ch = cfg.width
        mults = cfg.mults()
        for i, mult in enumerate(mults):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(ch, cfg.width * mult))
                ch = cfg.width * mult
            grow = 2 if cfg.double_bottleneck and i == len(mults) - 1 else 1
            layers.append(nn.Conv2d(ch, ch * grow, 4, stride=2, padding=1))
            ch *= grow
        layers += [ResBlock(ch, ch), norm(ch), nn.SiLU()]
        self.out_dim = cfg.out_dim or ch
        layers.append(nn.Conv2d(ch, self.out_dim, 1))
        self.net = nn.Sequential(*layers)
        self.final_activation = make_final_activation(cfg.final_activation)

    def forward(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        tokens, grid = tokens_from_map(self.net(images))
        return self.final_activation(tokens), grid


@hookimpl
def register_encoders(register):
    register("conv", ConvEncoder)
