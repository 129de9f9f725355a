"""VQGAN-style convolutional decoder, the mirror of the conv encoder."""
from __future__ import annotations

import math
from typing import Literal, Optional

from pydantic import Field
from torch import Tensor, nn

from core.errors import ConfigError
from core.hookspecs import hookimpl
from core.interfaces import ComponentConfig, Decoder
from plugins.encoders.conv import ResBlock, norm


class ConvDecoderConfig(ComponentConfig):
    type: Literal["conv"] = "conv"
    width: int = Field(64, gt=0)  # channels before the output conv
    channel_mult: Optional[list[int]] = None  # per upsampling stage, deepest first (default all 1)
    num_res_blocks: int = Field(1, ge=0)  # residual blocks per stage


class ConvDecoder(Decoder):
    """1x1 conv in, per stage: nearest x2 upsample + conv + residual blocks; GroupNorm-SiLU-conv to RGB."""

    Config = ConvDecoderConfig

    def __init__(self, cfg: ConvDecoderConfig, in_dim: int, image_size: int, downsample: int) -> None:
        super().__init__()
        self.cfg = cfg
        stages = int(math.log2(downsample))
        mults = cfg.channel_mult or [1] * stages
        if len(mults) != stages:
            raise ConfigError("channel_mult", f"needs {stages} entries (one per upsampling stage), got {len(mults)}")
        ch = cfg.width * (mults[0] if mults else 1)
        layers: list[nn.Module] = [nn.Conv2d(in_dim, ch, 1), ResBlock(ch, ch)]
        for mult in mults:
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)]
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(ch, cfg.width * mult))
                ch = cfg.width * mult
        layers += [norm(ch), nn.SiLU()]
        self.net = nn.Sequential(*layers)
        self.out = nn.Conv2d(ch, 3, 3, padding=1)

    def forward(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        b, n, c = tokens.shape
        x = tokens.transpose(1, 2).reshape(b, c, *grid)
        return self.out(self.net(x))

    @property
    def last_layer(self) -> Tensor:
        return self.out.weight


@hookimpl
def register_decoders(register):
    register("conv", ConvDecoder)
