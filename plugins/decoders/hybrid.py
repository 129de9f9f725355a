"""Hybrid decoder, the mirror of the ``hybrid`` encoder: transformer blocks, then upsampling conv stages.

UniTok's decoder mirrors ViTamin: ViT blocks on the tokens, then conv stages that upsample by 2
each, ``log2(downsample)`` times, to RGB. Linear in -> positional embedding -> timm Blocks -> LN ->
token map -> 1x1 conv -> (nearest x2 + conv + residual blocks) per stage -> GroupNorm-SiLU-conv.
This conv part is vtok's own (VQGAN-style); the ``vitamin`` decoder is the official UniTok layout.
GeGLU gate GELU (``gelu``), stochastic depth (``drop_path``) and the re-initialisation (``init``)
default to UniTok's decoder (FoundationVision/UniTok ``models/vitamin.py`` ``ViTaminDecoder``,
``models/__init__.py`` ``build_unitok``; see ``plugins/weight_init.py``).
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field
from torch import Tensor, nn

from core.hookspecs import hookimpl
from core.interfaces import ComponentConfig, Decoder
from plugins.decoders.conv import stage_mults, upsampling_stages
from plugins.encoders.conv import map_from_tokens, norm
from plugins.encoders.vit import PosEmbed, PositionalEmbedding, TransformerFields, transformer_blocks
from plugins.weight_init import Init, apply_init


class HybridDecoderConfig(ComponentConfig, TransformerFields):
    type: Literal["hybrid"] = "hybrid"
    conv_width: int = Field(32, gt=0)  # channels of the finest conv stage (before RGB)
    channel_mult: Optional[list[int]] = None  # per upsampling stage, deepest first, log2(downsample) entries (default all 1)
    num_res_blocks: int = Field(1, ge=0)  # residual blocks per upsampling stage
    mlp_ratio: float = Field(2.0, gt=0)  # MLP hidden width / width (ViTamin: 2 with GeGLU)
    mlp: Literal["gelu", "geglu"] = "geglu"  # block MLP (ViTamin: GeGLU)
    pos_embed: PosEmbed = "none"  # positional embedding before the blocks (the mirror of the encoder: none)
    init: Init = "unitok"  # unitok: UniTok's decoder re-initialisation (trunc-normal 0.02 Linear, Xavier 0.5 conv, zero biases); torch: layer defaults


class HybridDecoder(Decoder):
    """Linear in -> timm Blocks -> LN -> upsampling conv stages -> RGB."""

    Config = HybridDecoderConfig

    def __init__(self, cfg: HybridDecoderConfig, in_dim: int, image_size: int, downsample: int) -> None:
        super().__init__()
        self.cfg = cfg
        mults = stage_mults(cfg.channel_mult, downsample)
        self.embed = nn.Linear(in_dim, cfg.width)
        self.pos_embed = PositionalEmbedding(cfg.pos_embed, cfg.width, (image_size // downsample,) * 2)
        self.blocks = transformer_blocks(cfg)
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)
        deepest = cfg.conv_width * (mults[0] if mults else 1)
        stages, ch = upsampling_stages(deepest, cfg.conv_width, mults, cfg.num_res_blocks)
        self.convs = nn.Sequential(nn.Conv2d(cfg.width, deepest, 1), *stages, norm(ch), nn.SiLU())
        self.out = nn.Conv2d(ch, 3, 3, padding=1)
        apply_init(self, cfg.init)

    def forward(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        x = self.norm(self.blocks(self.pos_embed(self.embed(tokens))))
        return self.out(self.convs(map_from_tokens(x, grid)))

    @property
    def last_layer(self) -> Tensor:
        return self.out.weight


@hookimpl
def register_decoders(register):
    register("hybrid", HybridDecoder)
