"""Hybrid encoder: ViTamin-style conv stem + MbConv stages, then transformer blocks.

UniTok's encoder is ViTamin-L (timm ``vitamin_large``): a conv stem and two MbConv stages (total
stride 8), a strided conv to width 1024 (stride 16), then 31 transformer blocks with a GeGLU MLP,
patch size 1 over the stem output, no positional embedding and no class token. UniWeTok's Table 7
finds such a hybrid beats CNN-only and transformer-only backbones.

Two ways to build it:
- ``timm_model: vitamin_large`` (or ``vitamin_base``, or any timm ``vitamin_*`` name) builds exactly
  the timm model (random init, ``pretrained=False``: nothing is downloaded) for the full-scale
  config; its widths come from timm.
- otherwise the same layout from timm's ViTamin building blocks at any width and any power-of-two
  ``downsample`` >= 4: Stem (stride 2), ``log2(downsample) - 2`` MbConv stages (stride 2 each), a
  strided conv (stride 2) to ``width``, then timm Blocks -- small enough for a CPU.

Both follow UniTok's encoder (FoundationVision/UniTok ``models/unitok.py``, ``UniTok.__init__``):
GeGLU gated by the tanh GELU (``gelu: tanh``) and stochastic depth ``drop_path`` (0.1 there) over
the transformer blocks; the MbConv stages have neither (as in ViTamin). The encoder keeps timm's
initialisation (UniTok does not re-initialise it). UniTok's encoder also holds a frozen all-zero
``pos_embed`` of shape (1, 1, width) that adds nothing; vtok has no such tensor
(``python -m core.convert`` checks it is zero and drops it).
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator
from torch import Tensor, nn

from core.hookspecs import hookimpl
from core.interfaces import Encoder, EncoderConfig
from plugins.encoders.conv import log2_exact
from plugins.encoders.vit import GELU_LAYER, PosEmbed, PositionalEmbedding, TransformerFields, transformer_blocks
from plugins.final_activation import FinalActivation, make_final_activation

# short names used in the papers' configs -> timm model names (img_size is passed separately)
TIMM_ALIASES = {"vitamin_small": "vitamin_small_224", "vitamin_base": "vitamin_base_224",
                "vitamin_large": "vitamin_large_256", "vitamin_large2": "vitamin_large2_256",
                "vitamin_xlarge": "vitamin_xlarge_256"}
# fields whose value the timm model fixes (changing them from the default with timm_model is an error)
_TIMM_FIXED = ("width", "depth", "heads", "mlp_ratio", "mlp", "conv_width", "channel_mult", "conv_depth")


class HybridConfig(EncoderConfig, TransformerFields):
    type: Literal["hybrid"] = "hybrid"
    downsample: int = Field(16, ge=4)  # total stride of the conv part, a power of two >= 4
    conv_width: int = Field(32, gt=0)  # stem channels (ViTamin-L: 160)
    channel_mult: Optional[list[int]] = None  # width multiplier per MbConv stage, log2(downsample)-2 entries (ViTamin-L: [1, 2])
    conv_depth: int = Field(2, gt=0)  # MbConv blocks per stage (the first one strides)
    mlp_ratio: float = Field(2.0, gt=0)  # MLP hidden width / width (ViTamin: 2 with GeGLU)
    mlp: Literal["gelu", "geglu"] = "geglu"  # block MLP (ViTamin: GeGLU)
    pos_embed: PosEmbed = "none"  # UniTok's ViTamin encoder has no positional embedding
    timm_model: Optional[str] = None  # build this timm ViTamin instead (e.g. vitamin_large); widths come from timm
    final_activation: FinalActivation = "none"  # last op on the tokens: none | siglu | tanh

    @model_validator(mode="after")
    def _check(self) -> "HybridConfig":
        if self.downsample & (self.downsample - 1):
            raise ValueError(f"downsample must be a power of two, got {self.downsample}")
        if self.timm_model is not None:
            return self._check_timm()
        stages = log2_exact(self.downsample) - 2
        if self.channel_mult is not None and len(self.channel_mult) != stages:
            raise ValueError(f"channel_mult needs {stages} entries (one per MbConv stage: log2(downsample) - 2), got {len(self.channel_mult)}")
        return self

    def _check_timm(self) -> "HybridConfig":
        import timm

        name = TIMM_ALIASES.get(self.timm_model, self.timm_model)
        if not name.startswith("vitamin_") or not timm.is_model(name):
            raise ValueError(f"timm_model '{self.timm_model}' is not a timm ViTamin model (e.g. vitamin_base, vitamin_large)")
        # compared with the defaults (not model_fields_set) so a saved, fully dumped config reloads
        clash = [f for f in _TIMM_FIXED if getattr(self, f) != type(self).model_fields[f].default]
        if clash:
            raise ValueError(f"{', '.join(clash)} cannot be set together with timm_model (the timm model fixes them)")
        if self.downsample != 16:
            raise ValueError(f"timm ViTamin models have stride 16, got downsample {self.downsample}")
        if self.pos_embed == "sincos":
            raise ValueError("timm ViTamin models support pos_embed 'none' or 'learn'")
        return self

    def mults(self) -> list[int]:
        return self.channel_mult or [1] * (log2_exact(self.downsample) - 2)


def vitamin_stem(cfg: HybridConfig) -> tuple[nn.Sequential, int]:
    """timm's ViTamin conv part at any stride: Stem /2, MbConv stages /2 each, strided conv /2 to width."""
    from timm.models.vitamin import MbConvLNBlock, Stem, StridedConv

    layers: list[nn.Module] = [Stem(3, cfg.conv_width)]
    ch = cfg.conv_width
    for mult in cfg.mults():
        out = cfg.conv_width * mult
        layers += [MbConvLNBlock(ch if d == 0 else out, out, stride=2 if d == 0 else 1) for d in range(cfg.conv_depth)]
        ch = out
    layers.append(StridedConv(stride=2, in_chans=ch, embed_dim=cfg.width))
    return nn.Sequential(*layers), cfg.width


class TimmViTamin(nn.Module):
    """A timm ViTamin (no class token, no head, random init) returning its final-normed tokens."""

    def __init__(self, cfg: HybridConfig, image_size: int) -> None:
        super().__init__()
        import timm

        name = TIMM_ALIASES.get(cfg.timm_model, cfg.timm_model)
        self.model = timm.create_model(name, pretrained=False, img_size=image_size, num_classes=0,
                                       global_pool="", pos_embed=cfg.pos_embed, class_token=False,
                                       act_layer=GELU_LAYER[cfg.gelu], drop_path_rate=cfg.drop_path)
        self.width = self.model.embed_dim

    def forward(self, images: Tensor) -> Tensor:
        return self.model.forward_features(images)


class HybridEncoder(Encoder):
    """Conv stem + MbConv stages (timm ViTamin blocks) -> timm transformer Blocks -> LN -> Linear to out_dim."""

    Config = HybridConfig

    def __init__(self, cfg: HybridConfig, image_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.downsample = cfg.downsample
        grid = (image_size // cfg.downsample,) * 2
        if cfg.timm_model is not None:
            self.trunk: nn.Module = TimmViTamin(cfg, image_size)
            width = self.trunk.width
        else:
            stem, width = vitamin_stem(cfg)
            self.trunk = _OwnTrunk(stem, PositionalEmbedding(cfg.pos_embed, width, grid), transformer_blocks(cfg), width)
        self.out_dim = cfg.out_dim or width
        self.head = nn.Linear(width, self.out_dim) if self.out_dim != width else nn.Identity()
        self.final_activation = make_final_activation(cfg.final_activation)

    def forward(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        grid = (images.shape[-2] // self.downsample, images.shape[-1] // self.downsample)
        return self.final_activation(self.head(self.trunk(images))), grid

    def unitok_state_names(self) -> dict[str, Optional[str]]:
        """UniTok encoder (a timm ViTamin) state-dict name -> own (``python -m core.convert``).
        UniTok's frozen all-zero ``pos_embed`` maps to None (no counterpart). A head (out_dim !=
        width) or a learned positional embedding has no official counterpart and stays unmapped."""
        names: dict[str, Optional[str]] = {"pos_embed": None}
        for key in self.state_dict():
            if key.startswith("trunk.model."):
                names[key.removeprefix("trunk.model.")] = key
            elif key.startswith("trunk.stem."):
                names[self._official_conv_name(key.removeprefix("trunk.stem."))] = key
            elif key.startswith(("trunk.blocks.", "trunk.norm.")):
                names[key.removeprefix("trunk.")] = key
        return names

    def _official_conv_name(self, key: str) -> str:
        """Index in the own conv Sequential (stem, MbConv blocks stage by stage, strided conv) -> timm's nesting."""
        i, rest = key.split(".", 1)
        i, depth, n_blocks = int(i), self.cfg.conv_depth, self.cfg.conv_depth * len(self.cfg.mults())
        if i == 0:
            return f"patch_embed.backbone.stem.{rest}"
        if i <= n_blocks:
            return f"patch_embed.backbone.stages.{(i - 1) // depth}.{(i - 1) % depth}.{rest}"
        return f"patch_embed.backbone.pool.{rest}"


class _OwnTrunk(nn.Module):
    """conv part -> tokens -> positional embedding -> blocks -> LayerNorm (the layout timm's ViTamin has)."""

    def __init__(self, stem: nn.Module, pos: nn.Module, blocks: nn.Module, width: int) -> None:
        super().__init__()
        self.stem, self.pos_embed, self.blocks = stem, pos, blocks
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def forward(self, images: Tensor) -> Tensor:
        x = self.stem(images).flatten(2).transpose(1, 2)
        return self.norm(self.blocks(self.pos_embed(x)))


@hookimpl
def register_encoders(register):
    register("hybrid", HybridEncoder)
