"""Contract over EVERY registered projector, encoder and decoder (new plugins are tested for free):
shapes, gradients to the input, the fp32 island under bf16 autocast, default configs build."""
from __future__ import annotations

import pytest
import torch

from core.model import fp32
from core.plugins import get_registry

REG = get_registry()


@pytest.mark.parametrize("name", REG.names("projectors"))
@pytest.mark.parametrize("in_dim,out_dim", [(32, 8), (8, 32), (16, 16)])
def test_projector_contract(name, in_dim, out_dim):
    cls = REG.get("projectors", name)
    torch.manual_seed(0)
    p = cls(cls.Config(type=name), in_dim=in_dim, out_dim=out_dim)
    x = torch.randn(2, 5, in_dim, requires_grad=True)
    y = p(x)
    assert y.shape == (2, 5, out_dim) and torch.isfinite(y).all()
    y.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = fp32(p, x.detach().bfloat16())
    assert z.dtype == torch.float32
    torch.testing.assert_close(z, p(x.detach().bfloat16().float()))


@pytest.mark.parametrize("name", REG.names("encoders"))
def test_encoder_and_decoder_defaults_build_and_run(name):
    """The default config of each encoder (and the same-named decoder) runs at 32 px."""
    enc_cls = REG.get("encoders", name)
    torch.manual_seed(0)
    cfg = enc_cls.Config(type=name)
    if cfg.downsample > 32:
        pytest.skip("default stride larger than the test image")
    enc = enc_cls(cfg, image_size=32)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    tokens, grid = enc(x)
    assert grid == (32 // enc.downsample,) * 2 and tokens.shape == (1, grid[0] * grid[1], enc.out_dim)
    if name in REG.names("decoders"):
        dec_cls = REG.get("decoders", name)
        dec = dec_cls(dec_cls.Config(type=name), in_dim=enc.out_dim, image_size=32, downsample=enc.downsample)
        assert dec(tokens, grid).shape == x.shape
        assert dec.last_layer.requires_grad
