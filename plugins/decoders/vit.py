"""Vision-transformer decoder, the mirror of the ``vit`` encoder.

Linear in -> positional embedding -> timm Blocks -> LayerNorm -> Linear to ``downsample^2 * 3``
pixels per token -> un-patchify. GeGLU gate GELU (``gelu``), stochastic depth (``drop_path``) and the
re-initialisation (``init``) default to UniTok's decoder (FoundationVision/UniTok ``models/vitamin.py``
``ViTaminDecoder``, ``models/__init__.py`` ``build_unitok``; see ``plugins/weight_init.py``).
"""
from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from core.hookspecs import hookimpl
from core.interfaces import ComponentConfig, Decoder
from plugins.encoders.vit import PositionalEmbedding, TransformerFields, transformer_blocks
from plugins.weight_init import Init, apply_init


class ViTDecoderConfig(ComponentConfig, TransformerFields):
    type: Literal["vit"] = "vit"
    init: Init = "unitok"  # unitok: UniTok's decoder re-initialisation (trunc-normal 0.02 Linear, Xavier 0.5 conv, zero biases); torch: layer defaults


def unpatchify(x: Tensor, grid: tuple[int, int], p: int) -> Tensor:
    """``(B, h*w, p*p*3)`` -> ``(B, 3, h*p, w*p)``; each token's pixels are ordered (row, col, channel)."""
    b, (h, w) = x.shape[0], grid
    return x.reshape(b, h, w, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(b, 3, h * p, w * p)


class ViTDecoder(Decoder):
    """Linear in -> timm Blocks -> LayerNorm -> Linear to pixels -> un-patchify."""

    Config = ViTDecoderConfig

    def __init__(self, cfg: ViTDecoderConfig, in_dim: int, image_size: int, downsample: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch = downsample
        grid = (image_size // downsample,) * 2
        self.embed = nn.Linear(in_dim, cfg.width)
        self.pos_embed = PositionalEmbedding(cfg.pos_embed, cfg.width, grid)
        self.blocks = transformer_blocks(cfg)
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)
        self.out = nn.Linear(cfg.width, downsample * downsample * 3)
        apply_init(self, cfg.init)

    def forward(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        x = self.norm(self.blocks(self.pos_embed(self.embed(tokens))))
        return unpatchify(self.out(x), grid, self.patch)

    @property
    def last_layer(self) -> Tensor:
        return self.out.weight


@hookimpl
def register_decoders(register):
    register("vit", ViTDecoder)
