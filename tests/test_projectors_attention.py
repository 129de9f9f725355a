"""UniTok attention projection: a direct reference of the formula, head averaging vs concatenation,
causality, and config errors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from core.errors import ConfigError
from plugins.projectors.attention import AttentionConfig, AttentionProjector


def _randomize(module: torch.nn.Module) -> None:
    """Non-trivial values everywhere (biases and LayerNorm affines start at 0/1)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def reference(p: AttentionProjector, x: torch.Tensor, causal: bool) -> torch.Tensor:
    """The formula written out token by token and head by head (no SDPA, no reshapes of qkv)."""
    def ln(m, t):
        return (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + m.eps) * m.weight + m.bias

    a = p.attn
    in_dim, out_dim = p.linear.in_features, p.linear.out_features
    inner = max(in_dim, out_dim)
    hd = min(in_dim, out_dim) if a.average else out_dim // a.heads
    h_attn = ln(p.norm_attn, x)
    W = a.qkv.weight
    q = h_attn @ W[:inner].T + a.q_bias
    k = h_attn @ W[inner:2 * inner].T
    v = h_attn @ W[2 * inner:].T + a.v_bias
    B, N, _ = x.shape
    heads_out = []
    for h in range(a.heads):
        sl = slice(h * hd, (h + 1) * hd)
        o = torch.zeros(B, N, hd)
        for t in range(N):
            keys = range(t + 1) if causal else range(N)
            s = torch.stack([(q[:, t, sl] * k[:, j, sl]).sum(-1) / math.sqrt(hd) for j in keys], dim=-1)
            w = torch.softmax(s, dim=-1)
            o[:, t] = sum(w[:, i:i + 1] * v[:, j, sl] for i, j in enumerate(keys))
        heads_out.append(o)
    if a.average:  # compression: head width = out, heads averaged
        o = torch.stack(heads_out).mean(0)
    else:  # expansion: heads concatenated
        o = torch.cat(heads_out, dim=-1)
    attn = o @ a.proj.weight.T + a.proj.bias
    y = ln(p.norm_linear, x) @ p.linear.weight.T + p.linear.bias + attn
    m = p.mlp
    hm = ln(m.norm, y)
    return y + (F.gelu(hm @ m.w0.weight.T + m.w0.bias) * (hm @ m.w1.weight.T + m.w1.bias)) @ m.w2.weight.T + m.w2.bias


@pytest.mark.parametrize("in_dim,out_dim,heads", [(12, 4, None), (4, 12, None), (4, 8, 4), (6, 6, 2)])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_reference(in_dim, out_dim, heads, causal):
    torch.manual_seed(0)
    p = AttentionProjector(AttentionConfig(heads=heads, causal=causal), in_dim=in_dim, out_dim=out_dim)
    _randomize(p)
    x = torch.randn(2, 5, in_dim)
    y = p(x)
    assert y.shape == (2, 5, out_dim)
    torch.testing.assert_close(y, reference(p, x, causal), rtol=1e-4, atol=1e-5)


def test_compression_averages_heads():
    """12 -> 4: three heads of width 4; qkv is Linear(12, 3*12) without bias, plus q/v biases."""
    p = AttentionProjector(AttentionConfig(), in_dim=12, out_dim=4)
    assert (p.attn.heads, p.attn.head_dim, p.attn.average) == (3, 4, True)
    assert p.attn.qkv.weight.shape == (36, 12) and p.attn.qkv.bias is None
    assert p.attn.q_bias.shape == (12,) and p.attn.v_bias.shape == (12,)
    assert p.attn.proj.weight.shape == (4, 4)
    assert p.mlp.w0.out_features == 8  # GeGLU hidden = 2 * out


def test_expansion_concatenates_heads():
    p = AttentionProjector(AttentionConfig(), in_dim=4, out_dim=16)
    assert (p.attn.heads, p.attn.head_dim, p.attn.average) == (4, 4, False)


def test_causal_prefix_unchanged():
    torch.manual_seed(1)
    p = AttentionProjector(AttentionConfig(causal=True), in_dim=16, out_dim=4)
    _randomize(p)
    x = torch.randn(1, 7, 16)
    x2 = x.clone()
    x2[:, 4] += torch.randn(16)  # change token t+1 = 4
    y, y2 = p(x), p(x2)
    torch.testing.assert_close(y[:, :4], y2[:, :4])
    assert (y[:, 4] - y2[:, 4]).abs().max() > 1e-3
    # full attention: every token sees the change
    p.attn.causal = False
    assert (p(x)[:, 0] - p(x2)[:, 0]).abs().max() > 1e-4


def test_gradients_reach_every_parameter():
    p = AttentionProjector(AttentionConfig(), in_dim=8, out_dim=4)
    _randomize(p)
    p(torch.randn(2, 3, 8)).square().sum().backward()
    assert all(q.grad is not None and q.grad.abs().sum() > 0 for q in p.parameters())


@pytest.mark.parametrize("in_dim,out_dim,heads", [(10, 4, None), (12, 4, 2), (4, 10, 3)])
def test_bad_widths_are_config_errors(in_dim, out_dim, heads):
    with pytest.raises(ConfigError):
        AttentionProjector(AttentionConfig(heads=heads), in_dim=in_dim, out_dim=out_dim)
