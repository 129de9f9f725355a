"""Encoders/decoders: shapes for every backbone and downsampling factor, final activations, the
double bottleneck, ViT un-patchify order and config errors."""
from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from core.errors import ConfigError
from plugins.decoders.conv import ConvDecoder, ConvDecoderConfig
from plugins.decoders.hybrid import HybridDecoder, HybridDecoderConfig
from plugins.decoders.vit import ViTDecoder, ViTDecoderConfig, unpatchify
from plugins.encoders.conv import ConvConfig, ConvEncoder
from plugins.encoders.hybrid import HybridConfig, HybridEncoder
from plugins.encoders.vit import ViTConfig, ViTEncoder
from plugins.final_activation import make_final_activation, siglu

SIZE = 32
TINY_T = {"width": 16, "depth": 1, "heads": 2}


def build(backbone: str, down: int, final_activation: str = "none"):
    if backbone == "conv":
        enc = ConvEncoder(ConvConfig(width=8, downsample=down, out_dim=6, final_activation=final_activation), image_size=SIZE)
        dec = ConvDecoder(ConvDecoderConfig(width=8), in_dim=6, image_size=SIZE, downsample=down)
    elif backbone == "vit":
        enc = ViTEncoder(ViTConfig(downsample=down, out_dim=6, final_activation=final_activation, **TINY_T), image_size=SIZE)
        dec = ViTDecoder(ViTDecoderConfig(**TINY_T), in_dim=6, image_size=SIZE, downsample=down)
    else:
        enc = HybridEncoder(HybridConfig(downsample=down, conv_width=4, out_dim=6, final_activation=final_activation, **TINY_T), image_size=SIZE)
        dec = HybridDecoder(HybridDecoderConfig(conv_width=4, **TINY_T), in_dim=6, image_size=SIZE, downsample=down)
    return enc, dec


@pytest.mark.parametrize("backbone", ["conv", "vit", "hybrid"])
@pytest.mark.parametrize("down", [4, 8, 16, 32])
def test_round_trip_shapes(backbone, down):
    torch.manual_seed(0)
    enc, dec = build(backbone, down)
    x = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    tokens, grid = enc(x)
    h = SIZE // down
    assert grid == (h, h) and tokens.shape == (2, h * h, 6) and enc.out_dim == 6 and enc.downsample == down
    y = dec(tokens, grid)
    assert y.shape == x.shape
    y.square().mean().backward()
    assert dec.last_layer.grad is not None and dec.last_layer.grad.abs().sum() > 0
    assert all(p.grad is not None for p in enc.parameters() if p.requires_grad)


def test_tokens_are_row_major():
    """Token t of a conv encoder is grid cell (t // w, t % w): a 1x1 map read back is the map."""
    from plugins.encoders.conv import map_from_tokens, tokens_from_map
    m = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    t, grid = tokens_from_map(m)
    assert grid == (4, 5) and torch.equal(t[1, 2 * 5 + 3], m[1, :, 2, 3])
    assert torch.equal(map_from_tokens(t, grid), m)


def test_unpatchify_places_pixels():
    p, grid = 2, (2, 3)
    img = torch.arange(3 * 4 * 6, dtype=torch.float32).view(1, 3, 4, 6)
    # patchify by hand: token (i, j) holds its p x p x 3 pixels in (row, col, channel) order
    tokens = torch.stack([img[0, :, i * p:(i + 1) * p, j * p:(j + 1) * p].permute(1, 2, 0).reshape(-1)
                          for i in range(2) for j in range(3)]).unsqueeze(0)
    assert torch.equal(unpatchify(tokens, grid, p), img)


def test_siglu_formula_and_bounds():
    x = torch.linspace(-50, 50, 1001, dtype=torch.float64)
    y = siglu(x)
    small = x.abs() < 20
    ref = (1 - torch.exp(x[small])) / (1 + torch.exp(x[small]))
    torch.testing.assert_close(y[small], ref)
    assert y.min() >= -1 and y.max() <= 1 and torch.isfinite(y).all()
    assert y[0] == pytest.approx(1.0) and y[-1] == pytest.approx(-1.0)  # decreasing: sign flips
    assert float(siglu(torch.tensor(1.0))) == pytest.approx((1 - math.e) / (1 + math.e))


@pytest.mark.parametrize("backbone", ["conv", "vit", "hybrid"])
@pytest.mark.parametrize("act", ["siglu", "tanh"])
def test_final_activation_bounds_every_encoder(backbone, act):
    torch.manual_seed(0)
    enc, _ = build(backbone, 8, act)
    with torch.no_grad():
        for p in enc.parameters():
            p.mul_(20)  # push the pre-activation far out
        tokens, _ = enc(torch.rand(2, 3, SIZE, SIZE) * 2 - 1)
    assert tokens.abs().max() <= 1 and tokens.abs().max() > 0.9


def test_final_activation_none_is_identity():
    x = torch.randn(5)
    assert torch.equal(make_final_activation("none")(x), x)


def test_double_bottleneck_widths():
    enc = ConvEncoder(ConvConfig(width=8, downsample=8, channel_mult=[1, 2, 2], double_bottleneck=True), image_size=SIZE)
    assert enc.out_dim == 32  # 8 * 2 (mult) * 2 (doubled at the last downsampling)
    downs = [m for m in enc.net if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)]
    assert [(m.in_channels, m.out_channels) for m in downs] == [(8, 8), (16, 16), (16, 32)]
    plain = ConvEncoder(ConvConfig(width=8, downsample=8, channel_mult=[1, 2, 2]), image_size=SIZE)
    assert plain.out_dim == 16
    dec = ConvDecoder(ConvDecoderConfig(width=8, channel_mult=[2, 2, 1], double_bottleneck=True), in_dim=32, image_size=SIZE, downsample=8)
    assert dec.net[0].out_channels == 32  # 8 * 2 * 2
    assert dec(enc(torch.zeros(1, 3, SIZE, SIZE))[0], (4, 4)).shape == (1, 3, SIZE, SIZE)


def test_vit_pos_embed_none_is_permutation_equivariant():
    """Without a positional embedding the blocks cannot tell where a patch is."""
    torch.manual_seed(0)
    enc = ViTEncoder(ViTConfig(downsample=8, pos_embed="none", **TINY_T), image_size=16).eval()
    x = torch.randn(1, 3, 16, 16)
    swapped = torch.cat([x[..., 8:], x[..., :8]], dim=-1)  # swap the two patch columns
    t, _ = enc(x)
    t2, _ = enc(swapped)
    torch.testing.assert_close(t2[:, [1, 0, 3, 2]], t, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for n, p in enc.named_parameters() if "pos" in n) == 0


def test_hybrid_conv_part_strides():
    enc = HybridEncoder(HybridConfig(downsample=32, conv_width=4, channel_mult=[1, 2, 4], conv_depth=1, **TINY_T), image_size=64)
    x = enc.trunk.stem(torch.zeros(1, 3, 64, 64))
    assert x.shape == (1, 16, 2, 2)


@pytest.mark.parametrize("bad", [
    {"downsample": 12},
    {"downsample": 16, "channel_mult": [1]},
    {"timm_model": "resnet50"},
    {"timm_model": "vitamin_large", "width": 64},
    {"timm_model": "vitamin_large", "downsample": 32},
])
def test_hybrid_config_errors(bad):
    with pytest.raises(ValidationError):
        HybridConfig(**bad)


def test_vit_heads_must_divide_width():
    with pytest.raises(ValidationError, match="divisible by heads"):
        ViTConfig(width=10, heads=4)


def test_conv_decoder_channel_mult_length_is_config_error():
    with pytest.raises(ConfigError, match="channel_mult"):
        ConvDecoder(ConvDecoderConfig(channel_mult=[1]), in_dim=4, image_size=16, downsample=8)
