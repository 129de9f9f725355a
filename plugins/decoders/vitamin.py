"""UniTok's official decoder: ViTamin run backwards (FoundationVision/UniTok ``models/vitamin.py``,
``ViTaminDecoder``).

Tokens -> timm transformer Blocks (GeGLU MLP, no positional embedding) -> LayerNorm -> token map ->
``Upsample`` (nearest x2 + 3x3 conv, width -> ``stage_widths[0]``) -> per stage: inverted MbConv
blocks (the first one upsamples x2) -> inverse stem (nearest x2 + 3x3 conv, LayerNorm2d + GELU,
3x3 conv to RGB). Each x2 mirrors one stride of the ViTamin encoder (strided conv, MbConv stages,
stem), so ``len(stage_widths) = log2(downsample) - 2``; UniTok's ViTamin-L decoder is width 1024,
31 blocks of 16 heads, ``stage_widths: [320, 160]``, ``stage_depths: [4, 2]``.

Inverted MbConv block (pre-norm, the reverse of timm's ``MbConvLNBlock``): LayerNorm2d -> 1x1 conv
to ``4 * out`` -> GELU -> [x2 upsample + 3x3 conv, first block only] -> depthwise 3x3 -> GELU -> 1x1
conv to ``out``; shortcut: x2 upsample + 3x3 conv (first block), 1x1 conv (width change) or identity.
The convolutional GELUs are exact (erf); the GeGLU gate follows ``gelu`` (tanh, as UniTok).

UniTok feeds the post-projection tokens straight into the blocks (their width is the decoder's);
when ``in_dim`` differs a Linear maps it (not in the official model). Stochastic depth
(``drop_path``, 0.1 in UniTok) applies to the transformer blocks only, as there. ``init: unitok``
(default) re-initialises the decoder as UniTok's ``build_unitok`` does (``plugins/weight_init.py``).
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator
from timm.layers import LayerNorm2d, LayerNormAct2d, make_divisible
from torch import Tensor, nn

from core.errors import ConfigError
from core.hookspecs import hookimpl
from core.interfaces import ComponentConfig, Decoder
from plugins.encoders.conv import log2_exact, map_from_tokens
from plugins.encoders.vit import PosEmbed, PositionalEmbedding, TransformerFields, transformer_blocks
from plugins.weight_init import Init, apply_init


class ViTaminDecoderConfig(ComponentConfig, TransformerFields):
    type: Literal["vitamin"] = "vitamin"
    width: int = Field(1024, gt=0)  # transformer width (ViTamin-L: 1024)
    depth: int = Field(31, ge=0)  # transformer blocks (ViTamin-L: 31)
    heads: int = Field(16, gt=0)  # attention heads (ViTamin-L: 16)
    mlp_ratio: float = Field(2.0, gt=0)  # GeGLU hidden width / width (ViTamin: 2)
    mlp: Literal["gelu", "geglu"] = "geglu"  # block MLP (ViTamin: GeGLU)
    pos_embed: PosEmbed = "none"  # UniTok's decoder has no positional embedding
    stage_widths: list[int] = Field(default_factory=lambda: [320, 160])  # channels per MbConv stage, deepest first (ViTamin-L: 320, 160)
    stage_depths: list[int] = Field(default_factory=lambda: [4, 2])  # inverted MbConv blocks per stage (UniTok: 4, 2)
    expand_ratio: float = Field(4.0, gt=0)  # MbConv hidden width / out
    init: Init = "unitok"  # unitok: UniTok's decoder re-initialisation; torch: layer defaults

    @model_validator(mode="after")
    def _check_stages(self) -> "ViTaminDecoderConfig":
        if len(self.stage_widths) != len(self.stage_depths):
            raise ValueError(f"stage_widths ({len(self.stage_widths)}) and stage_depths ({len(self.stage_depths)}) need one entry per stage")
        if not self.stage_widths:
            raise ValueError("needs at least one MbConv stage (downsample >= 8)")
        if any(w <= 0 for w in self.stage_widths) or any(d <= 0 for d in self.stage_depths):
            raise ValueError("stage_widths and stage_depths must be positive")
        return self


class Upsample(nn.Module):
    """Nearest x2 then a 3x3 conv."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.up(x))


class InvMbConvBlock(nn.Module):
    """Pre-norm inverted bottleneck that upsamples x2 when ``up`` (see the module docstring)."""

    def __init__(self, in_ch: int, out_ch: int, up: bool, expand_ratio: float) -> None:
        super().__init__()
        mid = make_divisible(out_ch * expand_ratio)  # a multiple of 8, as timm's MbConv
        if up:
            self.shortcut: nn.Module = Upsample(in_ch, out_ch)
        else:
            self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.pre_norm = LayerNorm2d(in_ch, eps=1e-6)
        self.conv1_1x1 = nn.Conv2d(in_ch, mid, 1)
        self.act1 = nn.GELU()
        self.up = Upsample(mid, mid) if up else nn.Identity()
        self.conv2_kxk = nn.Conv2d(mid, mid, 3, padding=1, groups=mid)
        self.act2 = nn.GELU()
        self.conv3_1x1 = nn.Conv2d(mid, out_ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.up(self.act1(self.conv1_1x1(self.pre_norm(x))))
        return self.conv3_1x1(self.act2(self.conv2_kxk(h))) + self.shortcut(x)


class InvStem(nn.Module):
    """The mirror of ViTamin's stem: x2 upsample + 3x3 conv, LayerNorm2d + GELU, 3x3 conv to RGB."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = Upsample(in_ch, in_ch)
        self.norm1 = LayerNormAct2d(in_ch, eps=1e-6, act_layer=nn.GELU)
        self.conv2 = nn.Conv2d(in_ch, out_ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.norm1(self.conv1(x)))


class ViTaminDecoder(Decoder):
    """timm Blocks -> LN -> Upsample -> inverted MbConv stages -> inverse stem (UniTok's decoder)."""

    Config = ViTaminDecoderConfig

    def __init__(self, cfg: ViTaminDecoderConfig, in_dim: int, image_size: int, downsample: int) -> None:
        super().__init__()
        self.cfg = cfg
        if len(cfg.stage_widths) != log2_exact(downsample) - 2:
            raise ConfigError("stage_widths", f"downsample {downsample} needs log2({downsample}) - 2 = "
                                              f"{log2_exact(downsample) - 2} stages (upsample, stages and inverse stem double each), got {len(cfg.stage_widths)}")
        self.embed = nn.Linear(in_dim, cfg.width) if in_dim != cfg.width else nn.Identity()
        self.pos_embed = PositionalEmbedding(cfg.pos_embed, cfg.width, (image_size // downsample,) * 2)
        self.blocks = transformer_blocks(cfg)
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)
        self.upsample = Upsample(cfg.width, cfg.stage_widths[0])
        stages, ch = [], cfg.stage_widths[0]
        for width, depth in zip(cfg.stage_widths, cfg.stage_depths):
            stages.append(nn.Sequential(*[InvMbConvBlock(ch if d == 0 else width, width, d == 0, cfg.expand_ratio)
                                          for d in range(depth)]))
            ch = width
        self.stages = nn.Sequential(*stages)
        self.inv_stem = InvStem(ch, 3)
        apply_init(self, cfg.init)

    def forward(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        x = self.norm(self.blocks(self.pos_embed(self.embed(tokens))))
        return self.inv_stem(self.stages(self.upsample(map_from_tokens(x, grid))))

    @property
    def last_layer(self) -> Tensor:
        return self.inv_stem.conv2.weight

    def unitok_state_names(self) -> dict[str, Optional[str]]:
        """UniTok ``ViTaminDecoder`` state-dict name -> own (``python -m core.convert``):
        ``up_conv1`` is ``upsample``, ``up_conv2, 3, ...`` are ``stages.0, 1, ...``, ``up_conv4`` is
        ``inv_stem``; the blocks and the norm keep their names."""
        names: dict[str, Optional[str]] = {}
        n = len(self.cfg.stage_widths)
        for key in self.state_dict():
            head, rest = key.split(".", 1)
            if head == "stages":
                s, rest = rest.split(".", 1)
                head = f"up_conv{2 + int(s)}"
            else:
                head = {"upsample": "up_conv1", "inv_stem": f"up_conv{2 + n}"}.get(head, head)
            names[f"{head}.{rest}"] = key
        return names


@hookimpl
def register_decoders(register):
    register("vitamin", ViTaminDecoder)
