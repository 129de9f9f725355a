"""vtok's UniTok pieces against FoundationVision/UniTok's layout: the ViTamin decoder (weight-copied
against a module rebuilt here from the official structure), the tanh GELU of every GeGLU block,
stochastic depth, UniTok's re-initialisation and the CLIP head's LayerNorm epsilon."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from timm.layers import make_divisible
from timm.models.vision_transformer import Block
from torch import nn

from core.errors import ConfigError
from core.model import ClipImageHead
from plugins.decoders.hybrid import HybridDecoder, HybridDecoderConfig
from plugins.decoders.vit import ViTDecoder, ViTDecoderConfig
from plugins.decoders.vitamin import ViTaminDecoder, ViTaminDecoderConfig
from plugins.encoders.hybrid import HybridConfig, HybridEncoder
from plugins.encoders.vit import ViTConfig, ViTEncoder, drop_path_rates, transformer_blocks

TINY = {"width": 16, "depth": 2, "heads": 2}


# ---- the official decoder layout (models/vitamin.py ViTaminDecoder), rebuilt from its structure ----


class RefGeGlu(nn.Module):
    """UniTok's GeGluMlp: own LayerNorm (eps 1e-6), w2(gelu_tanh(w0 x) * w1 x)."""

    def __init__(self, in_features, hidden_features, **_):
        super().__init__()
        self.norm = nn.LayerNorm(in_features, eps=1e-6)
        self.w0, self.w1 = nn.Linear(in_features, hidden_features), nn.Linear(in_features, hidden_features)
        self.w2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        x = self.norm(x)
        return self.w2(F.gelu(self.w0(x), approximate="tanh") * self.w1(x))


def ln2d(m: nn.LayerNorm, x):
    return F.layer_norm(x.permute(0, 2, 3, 1), m.normalized_shape, m.weight, m.bias, 1e-6).permute(0, 3, 1, 2)


class RefUp(nn.Module):
    """Upsample2d: nearest x2 (functional), then a 3x3 conv."""

    def __init__(self, i, o):
        super().__init__()
        self.conv = nn.Conv2d(i, o, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class RefInvMbConv(nn.Module):
    def __init__(self, i, o, stride):
        super().__init__()
        mid = make_divisible(o * 4)
        self.shortcut = RefUp(i, o) if stride == 2 else (nn.Conv2d(i, o, 1) if i != o else nn.Identity())
        self.pre_norm = nn.LayerNorm(i)
        self.conv1_1x1 = nn.Conv2d(i, mid, 1)
        self.up = RefUp(mid, mid) if stride == 2 else nn.Identity()
        self.conv2_kxk = nn.Conv2d(mid, mid, 3, padding=1, groups=mid)
        self.conv3_1x1 = nn.Conv2d(mid, o, 1)

    def forward(self, x):
        h = self.up(F.gelu(self.conv1_1x1(ln2d(self.pre_norm, x))))
        return self.conv3_1x1(F.gelu(self.conv2_kxk(h))) + self.shortcut(x)


class RefInvStem(nn.Module):
    def __init__(self, i, o):
        super().__init__()
        self.conv1, self.norm1, self.conv2 = RefUp(i, i), nn.LayerNorm(i), nn.Conv2d(i, o, 3, padding=1)

    def forward(self, x):
        return self.conv2(F.gelu(ln2d(self.norm1, self.conv1(x))))


class RefViTaminDecoder(nn.Module):
    """blocks -> norm -> (B, C, H, W) -> up_conv1 -> up_conv2 -> up_conv3 -> up_conv4."""

    def __init__(self, width, depth, heads, dims, depths):
        super().__init__()
        self.blocks = nn.Sequential(*[Block(width, heads, mlp_ratio=2.0, qkv_bias=True, mlp_layer=RefGeGlu) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.up_conv1 = RefUp(width, dims[0])
        self.up_conv2 = nn.Sequential(*[RefInvMbConv(dims[0], dims[0], 2 if d == 0 else 1) for d in range(depths[0])])
        self.up_conv3 = nn.Sequential(*[RefInvMbConv(dims[0] if d == 0 else dims[1], dims[1], 2 if d == 0 else 1) for d in range(depths[1])])
        self.up_conv4 = RefInvStem(dims[1], 3)

    def forward(self, x):
        b, n, c = x.shape
        h = int(n ** 0.5)
        x = self.norm(self.blocks(x)).view(b, h, h, c).permute(0, 3, 1, 2)
        return self.up_conv4(self.up_conv3(self.up_conv2(self.up_conv1(x))))


def _randomize(module: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("dims,depths", [((16, 8), (2, 1)), ((12, 12), (1, 2))])
def test_vitamin_decoder_matches_official_layout(dims, depths):
    torch.manual_seed(0)
    ref = RefViTaminDecoder(16, 2, 2, dims, depths).eval()
    _randomize(ref)
    dec = ViTaminDecoder(ViTaminDecoderConfig(width=16, depth=2, heads=2, stage_widths=list(dims), stage_depths=list(depths)),
                         in_dim=16, image_size=64, downsample=16).eval()
    assert sum(p.numel() for p in dec.parameters()) == sum(p.numel() for p in ref.parameters())
    names = dec.unitok_state_names()  # the table python -m core.convert uses
    official = ref.state_dict()
    assert set(names) == set(official)
    dec.load_state_dict({names[k]: v for k, v in official.items()})
    tokens = torch.randn(2, 16, 16, dtype=torch.float64)
    out = dec.double()(tokens, (4, 4))
    assert out.shape == (2, 3, 64, 64)
    torch.testing.assert_close(out, ref.double()(tokens), rtol=1e-9, atol=1e-9)
    assert dec.last_layer is dec.inv_stem.conv2.weight


def test_vitamin_decoder_stage_count_is_checked():
    with pytest.raises(ConfigError, match="stage"):
        ViTaminDecoder(ViTaminDecoderConfig(**TINY, stage_widths=[8], stage_depths=[1]), in_dim=16, image_size=64, downsample=16)
    with pytest.raises(ValidationError):
        ViTaminDecoderConfig(**TINY, stage_widths=[8, 8], stage_depths=[1])
    # downsample 32: three stages; in_dim != width adds a Linear
    dec = ViTaminDecoder(ViTaminDecoderConfig(**TINY, stage_widths=[8, 8, 8], stage_depths=[1, 1, 1]), in_dim=6, image_size=64, downsample=32)
    assert dec(torch.randn(1, 4, 6), (2, 2)).shape == (1, 3, 64, 64)


# ---- GELU flavour in every GeGLU block ------------------------------------------------------------


def _geglu_acts(module: nn.Module) -> list[nn.Module]:
    return [m.act for m in module.modules() if type(m).__name__ == "GeGluMlp"]


def _modules(gelu: str) -> list[nn.Module]:
    kw = {**TINY, "mlp": "geglu", "gelu": gelu}
    return [ViTEncoder(ViTConfig(downsample=8, **kw), image_size=32),
            HybridEncoder(HybridConfig(downsample=8, conv_width=4, **kw), image_size=32),
            ViTDecoder(ViTDecoderConfig(**kw), in_dim=6, image_size=32, downsample=8),
            HybridDecoder(HybridDecoderConfig(conv_width=4, **kw), in_dim=6, image_size=32, downsample=8),
            ViTaminDecoder(ViTaminDecoderConfig(stage_widths=[8], stage_depths=[1], **kw), in_dim=6, image_size=32, downsample=8)]


@pytest.mark.parametrize("gelu,approximate", [("tanh", "tanh"), ("exact", "none")])
def test_geglu_gelu_flavour_everywhere(gelu, approximate):
    """Default tanh (UniTok's GeGluMlp); every GeGLU block of every encoder/decoder follows the field."""
    x = torch.linspace(-4, 4, 81)
    for m in _modules(gelu):
        acts = _geglu_acts(m)
        assert len(acts) == 2, type(m).__name__
        for act in acts:
            torch.testing.assert_close(act(x), F.gelu(x, approximate=approximate), rtol=0, atol=0)
    assert ViTConfig().gelu == "tanh" and ViTaminDecoderConfig().gelu == "tanh"


# ---- stochastic depth ---------------------------------------------------------------------------


def test_drop_path_rates_linear():
    assert drop_path_rates(0.1, 31)[0] == 0 and drop_path_rates(0.1, 31)[-1] == pytest.approx(0.1)
    assert drop_path_rates(0.1, 31)[15] == pytest.approx(0.05)
    assert drop_path_rates(0.3, 1) == [0.0]
    for m in _modules("tanh"):
        assert not any(type(x).__name__ == "DropPath" for x in m.modules())  # default 0: no stochastic depth


def test_drop_path_identity_in_eval_and_per_sample_in_training():
    torch.manual_seed(0)
    cfg = ViTConfig(width=16, depth=2, heads=2, mlp="geglu", drop_path=0.5)
    blocks = transformer_blocks(cfg)
    assert blocks[1].drop_path1.drop_prob == 0.5 and isinstance(blocks[0].drop_path1, nn.Identity)
    block = blocks[1]
    with torch.no_grad():  # MLP branch off: the block is x + DropPath(attn(norm1 x))
        block.mlp.w2.weight.zero_()
        block.mlp.w2.bias.zero_()
    plain = transformer_blocks(cfg.model_copy(update={"drop_path": 0.0}))[1]
    plain.load_state_dict(block.state_dict())
    x = torch.randn(4000, 3, 16)
    block.eval()
    with torch.no_grad():
        branch = plain(x) - x
        torch.testing.assert_close(block(x), plain(x), rtol=0, atol=0)  # eval: identity
        block.train()
        delta = block(x) - x
    kept = (delta - 2 * branch).flatten(1).abs().amax(1) < 1e-5  # kept samples are rescaled by 1 / (1 - 0.5)
    dropped = delta.flatten(1).abs().amax(1) == 0
    assert bool((kept ^ dropped).all())  # whole samples: all tokens kept or all dropped
    assert abs(dropped.float().mean().item() - 0.5) < 0.04  # 5 binomial sd
    torch.testing.assert_close(delta.mean(0), branch.mean(0), rtol=0, atol=0.15)  # E[output] = eval output


def test_drop_path_field_reaches_every_backbone():
    kw = {**TINY, "mlp": "geglu", "drop_path": 0.2}
    mods = [ViTEncoder(ViTConfig(downsample=8, **kw), image_size=32),
            HybridEncoder(HybridConfig(downsample=8, conv_width=4, **kw), image_size=32),
            ViTDecoder(ViTDecoderConfig(**kw), in_dim=6, image_size=32, downsample=8),
            HybridDecoder(HybridDecoderConfig(conv_width=4, **kw), in_dim=6, image_size=32, downsample=8),
            ViTaminDecoder(ViTaminDecoderConfig(stage_widths=[8], stage_depths=[1], **kw), in_dim=6, image_size=32, downsample=8)]
    for m in mods:
        rates = [d.drop_prob for d in m.modules() if type(d).__name__ == "DropPath"]
        assert rates == [pytest.approx(0.2)] * 2, type(m).__name__  # last block, both residual branches


# ---- UniTok's re-initialisation -----------------------------------------------------------------


def test_unitok_init_statistics():
    torch.manual_seed(0)
    dec = ViTaminDecoder(ViTaminDecoderConfig(width=64, depth=2, heads=2, stage_widths=[32, 16], stage_depths=[1, 1]),
                         in_dim=64, image_size=64, downsample=16)
    linears = [m for m in dec.modules() if isinstance(m, nn.Linear)]
    w = torch.cat([m.weight.flatten() for m in linears])
    assert abs(w.std().item() - 0.02) < 0.0005 and w.abs().max() <= 2.0
    assert all((m.bias == 0).all() for m in linears)
    convs = [m for m in dec.modules() if isinstance(m, nn.Conv2d)]
    assert all((m.bias == 0).all() for m in convs)
    conv = dec.upsample.conv  # Xavier normal, gain 0.5: std = 0.5 * sqrt(2 / (fan_in + fan_out))
    fan_in, fan_out = 64 * 9, 32 * 9
    assert conv.weight.std().item() == pytest.approx(0.5 * math.sqrt(2 / (fan_in + fan_out)), rel=0.05)
    norms = [m for m in dec.modules() if isinstance(m, nn.LayerNorm)]
    assert all((m.weight == 1).all() and (m.bias == 0).all() for m in norms)
    # torch's defaults differ (uniform Linear biases): the option does something
    plain = ViTaminDecoder(ViTaminDecoderConfig(width=64, depth=2, heads=2, stage_widths=[32, 16], stage_depths=[1, 1], init="torch"),
                           in_dim=64, image_size=64, downsample=16)
    assert any((m.bias != 0).any() for m in plain.modules() if isinstance(m, nn.Linear))
    for dec in (ViTDecoder(ViTDecoderConfig(**TINY), in_dim=6, image_size=32, downsample=8),
                HybridDecoder(HybridDecoderConfig(conv_width=4, **TINY), in_dim=6, image_size=32, downsample=8)):
        assert all((m.bias == 0).all() for m in dec.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None)


# ---- CLIP image head --------------------------------------------------------------------------------


def test_clip_head_layernorm_eps_is_unitok():
    """UniTok's fc_norm is LayerNorm(eps=1e-6): visible on tokens whose variance is near 1e-5."""
    torch.manual_seed(0)
    head = ClipImageHead(8, 4)
    assert head.norm.eps == 1e-6
    tokens = torch.randn(2, 5, 8) * 3e-3
    pooled = tokens.mean(1)
    want = F.normalize(head.proj(F.layer_norm(pooled, (8,), head.norm.weight, head.norm.bias, 1e-6)), dim=-1)
    other = F.normalize(head.proj(F.layer_norm(pooled, (8,), head.norm.weight, head.norm.bias, 1e-5)), dim=-1)
    torch.testing.assert_close(head(tokens), want)
    assert (want - other).abs().max() > 1e-3
