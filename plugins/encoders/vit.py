"""Vision-transformer encoder: timm PatchEmbed + timm transformer Blocks (UniWeTok's "transformer-only").

Also the shared transformer pieces of the ``vit`` and ``hybrid`` encoders and the ``vit``,
``hybrid`` and ``vitamin`` decoders: a stack of timm ``Block``s (plain GELU MLP or ViTamin's GeGLU
MLP) and the optional positional embedding (learned, fixed 2-D sin-cos, or none: UniTok's ViTamin
encoder has none).

Following FoundationVision/UniTok (``models/vitamin.py``): its ``GeGluMlp`` gates with the
tanh-approximated GELU (``gelu: tanh``, the default; ``exact`` is erf, timm's ``GeGluMlp`` default),
and its encoder and decoder use stochastic depth (``args.drop_path = 0.1`` in ``utils/config.py``,
passed to timm as ``drop_path_rate``): block i of n drops its residual branches with probability
``drop_path * i / (n - 1)`` (timm's linear rule), rescaling kept samples by 1 / (1 - p).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, Field, model_validator
from timm.layers import PatchEmbed
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from timm.models.vitamin import GeGluMlp
from torch import Tensor, nn

from core.hookspecs import hookimpl
from core.interfaces import Encoder, EncoderConfig
from plugins.final_activation import FinalActivation, make_final_activation

PosEmbed = Literal["learn", "sincos", "none"]
GeluKind = Literal["tanh", "exact"]
#: timm activation names of the two GELU flavours
GELU_LAYER = {"tanh": "gelu_tanh", "exact": "gelu"}


class TransformerFields(BaseModel):
    """Fields shared by every transformer-based encoder/decoder config (mixed into the Config)."""

    width: int = Field(256, gt=0)  # transformer width (token channels inside the blocks)
    depth: int = Field(4, ge=0)  # number of transformer blocks
    heads: int = Field(4, gt=0)  # attention heads per block (width must divide evenly)
    mlp_ratio: float = Field(4.0, gt=0)  # MLP hidden width / width
    mlp: Literal["gelu", "geglu"] = "gelu"  # block MLP: timm Mlp (GELU) or ViTamin's GeGLU
    pos_embed: PosEmbed = "learn"  # positional embedding added before the blocks
    gelu: GeluKind = "tanh"  # GELU inside the GeGLU MLP: tanh approximation (UniTok's GeGluMlp) or exact (erf); the plain MLP is always exact
    drop_path: float = Field(0.0, ge=0, lt=1)  # stochastic depth rate of the last block (linear from 0 over the blocks; UniTok: 0.1)

    @model_validator(mode="after")
    def _check_heads(self):
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.pos_embed == "sincos" and self.width % 4:
            raise ValueError(f"pos_embed 'sincos' needs width divisible by 4, got {self.width}")
        return self


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Stochastic depth per block: 0 for the first, ``rate`` for the last, linear in between (timm)."""
    return [rate * i / max(depth - 1, 1) for i in range(depth)]


def transformer_blocks(cfg: TransformerFields) -> nn.Sequential:
    """``depth`` pre-norm timm Blocks (qkv bias on, like ViT/ViTamin)."""
    kwargs = {"mlp_layer": GeGluMlp, "act_layer": GELU_LAYER[cfg.gelu]} if cfg.mlp == "geglu" else {}
    return nn.Sequential(*[Block(cfg.width, cfg.heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True, drop_path=p, **kwargs)
                           for p in drop_path_rates(cfg.drop_path, cfg.depth)])


class PositionalEmbedding(nn.Module):
    """Adds a (learned | fixed sin-cos | no) positional embedding to ``(B, h*w, C)`` tokens."""

    def __init__(self, kind: str, width: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.kind = kind
        if kind == "learn":
            self.pos = nn.Parameter(torch.zeros(1, grid[0] * grid[1], width))
            nn.init.trunc_normal_(self.pos, std=0.02)
        elif kind == "sincos":
            pos = build_sincos2d_pos_embed(list(grid), dim=width).reshape(1, grid[0] * grid[1], width)
            self.register_buffer("pos", pos, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return x if self.kind == "none" else x + self.pos.to(x.dtype)


class ViTConfig(EncoderConfig, TransformerFields):
    type: Literal["vit"] = "vit"
    downsample: int = Field(8, ge=1)  # patch size = total stride (H / h)
    final_activation: FinalActivation = "none"  # last op on the tokens: none | siglu | tanh


class ViTEncoder(Encoder):
    """Patchify (timm PatchEmbed) -> positional embedding -> timm Blocks -> LayerNorm -> Linear to out_dim."""

    Config = ViTConfig

    def __init__(self, cfg: ViTConfig, image_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.downsample = cfg.downsample
        self.patch_embed = PatchEmbed(image_size, cfg.downsample, 3, cfg.width)
        self.pos_embed = PositionalEmbedding(cfg.pos_embed, cfg.width, self.patch_embed.grid_size)
        self.blocks = transformer_blocks(cfg)
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)
        self.out_dim = cfg.out_dim or cfg.width
        self.head = nn.Linear(cfg.width, self.out_dim) if self.out_dim != cfg.width else nn.Identity()
        self.final_activation = make_final_activation(cfg.final_activation)

    def forward(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        grid = (images.shape[-2] // self.downsample, images.shape[-1] // self.downsample)
        x = self.blocks(self.pos_embed(self.patch_embed(images)))
        return self.final_activation(self.head(self.norm(x))), grid


@hookimpl
def register_encoders(register):
    register("vit", ViTEncoder)
