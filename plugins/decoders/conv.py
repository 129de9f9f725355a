"""VQGAN-style convolutional decoder, the mirror of the conv encoder.

Stages run deepest first: nearest x2 upsample + conv + residual blocks, ``log2(downsample)`` times.
With ``double_bottleneck`` the input and middle block run at twice the first stage's width and the
first upsampling conv halves it back (the mirror of the encoder's UniWeTok Table 4 option).
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field
from torch import Tensor, nn

from core.errors import ConfigError
from core.hookspecs import hookimpl
from core.interfaces import ComponentConfig, Decoder
from plugins.encoders.conv import ResBlock, log2_exact, map_from_tokens, norm


class ConvDecoderConfig(ComponentConfig):
    type: Literal["conv"] = "conv"
    width: int = Field(64, gt=0)  # channels before the output conv
    channel_mult: Optional[list[int]] = None  # per upsampling stage, deepest first (default all 1)
    num_res_blocks: int = Field(1, ge=0)  # residual blocks per stage
    double_bottleneck: bool = False  # bottleneck at twice the deepest stage's width (UniWeTok Table 4)


def upsampling_stages(ch: int, width: int, mults: list[int], num_res_blocks: int) -> tuple[list[nn.Module], int]:
    """Per stage (deepest first): nearest x2 + conv(ch -> width*mult) + residual blocks; returns the final width."""
    layers: list[nn.Module] = []
    for mult in mults:
        out = width * mult
        layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, out, 3, padding=1)]
        layers += [ResBlock(out, out) for _ in range(num_res_blocks)]
        ch = out
    return layers, ch


def stage_mults(channel_mult: Optional[list[int]], downsample: int) -> list[int]:
    stages = log2_exact(downsample)
    mults = channel_mult or [1] * stages
    if len(mults) != stages:
        raise ConfigError("channel_mult", f"needs {stages} entries (one per upsampling stage), got {len(mults)}")
    return mults


class ConvDecoder(Decoder):
    """1x1 conv in, per stage: nearest x2 upsample + conv + residual blocks; GroupNorm-SiLU-conv to RGB."""

    Config = ConvDecoderConfig

    def __init__(self, cfg: ConvDecoderConfig, in_dim: int, image_size: int, downsample: int) -> None:
        super().__init__()
        self.cfg = cfg
        mults = stage_mults(cfg.channel_mult, downsample)
        if cfg.double_bottleneck and not mults:
            raise ConfigError("double_bottleneck", "needs at least one upsampling stage (downsample >= 2)")
        bottleneck = cfg.width * (mults[0] if mults else 1) * (2 if cfg.double_bottleneck else 1)
        stages, ch = upsampling_stages(bottleneck, cfg.width, mults, cfg.num_res_blocks)
        self.net = nn.Sequential(nn.Conv2d(in_dim, bottleneck, 1), ResBlock(bottleneck, bottleneck),
                                 *stages, norm(ch), nn.SiLU())
        self.out = nn.Conv2d(ch, 3, 3, padding=1)

    def forward(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        return self.out(self.net(map_from_tokens(tokens, grid)))

    @property
    def last_layer(self) -> Tensor:
        return self.out.weight


@hookimpl
def register_decoders(register):
    register("conv", ConvDecoder)
