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
    hm = ln(m.norm, ln(p.norm_mlp, y))  # the block's LN, then the GeGLU MLP's own LN
    gelu = F.gelu(hm @ m.w0.weight.T + m.w0.bias, approximate="tanh" if p.cfg.gelu == "tanh" else "none")
    return y + (gelu * (hm @ m.w1.weight.T + m.w1.bias)) @ m.w2.weight.T + m.w2.bias


@pytest.mark.parametrize("in_dim,out_dim,heads", [(12, 4, None), (4, 12, None), (4, 8, 4), (6, 6, 2)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("gelu", ["tanh", "exact"])
def test_matches_reference(in_dim, out_dim, heads, causal, gelu):
    torch.manual_seed(0)
    p = AttentionProjector(AttentionConfig(heads=heads, causal=causal, gelu=gelu), in_dim=in_dim, out_dim=out_dim)
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


# ---- the official layout (FoundationVision/UniTok models/vqvae.py AttnProjection), rebuilt here ------


class OfficialGeGlu(torch.nn.Module):
    """UniTok's models/vitamin.py GeGluMlp: own LayerNorm (eps 1e-6), w2(gelu_tanh(w0 x) * w1 x)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim, eps=1e-6)
        self.w0, self.w1, self.w2 = torch.nn.Linear(dim, hidden), torch.nn.Linear(dim, hidden), torch.nn.Linear(hidden, dim)

    def forward(self, x):
        x = self.norm(x)
        return self.w2(F.gelu(self.w0(x), approximate="tanh") * self.w1(x))


class OfficialAttention(torch.nn.Module):
    """PlainAttention: qkv without bias + q/v biases, heads of width max/heads, mean over heads when compressing."""

    def __init__(self, in_dim: int, out_dim: int, heads: int) -> None:
        super().__init__()
        inner = max(in_dim, out_dim)
        self.heads, self.hd, self.compress = heads, inner // heads, in_dim > out_dim
        self.qkv = torch.nn.Linear(in_dim, 3 * inner, bias=False)
        self.q_bias = torch.nn.Parameter(torch.zeros(inner))
        self.v_bias = torch.nn.Parameter(torch.zeros(inner))
        self.register_buffer("zero_k_bias", torch.zeros(inner))
        self.proj = torch.nn.Linear(out_dim, out_dim)

    def forward(self, x):
        b, n, _ = x.shape
        qkv = F.linear(x, self.qkv.weight, torch.cat([self.q_bias, self.zero_k_bias, self.v_bias]))
        q, k, v = qkv.reshape(b, n, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) * self.hd ** -0.5, dim=-1) @ v
        a = a.mean(1) if self.compress else a.transpose(1, 2).reshape(b, n, -1)
        return self.proj(a)


class OfficialAttnProjection(torch.nn.Module):
    """x = proj(norm3 x) + attn(norm1 x); x = x + mlp(norm2 x); torch LayerNorms (eps 1e-5) outside the MLP."""

    def __init__(self, in_dim: int, out_dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm3 = torch.nn.LayerNorm(in_dim), torch.nn.LayerNorm(in_dim)
        self.attn = OfficialAttention(in_dim, out_dim, heads)
        self.proj = torch.nn.Linear(in_dim, out_dim)
        self.norm2 = torch.nn.LayerNorm(out_dim)
        self.mlp = OfficialGeGlu(out_dim, 2 * out_dim)

    def forward(self, x):
        x = self.proj(self.norm3(x)) + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def copy_official_into_vtok(official: torch.nn.Module, p: AttentionProjector) -> None:
    """Through the projector's own name table (the one python -m core.convert uses)."""
    names = p.unitok_state_names()
    sd = official.state_dict()
    assert set(names) == set(sd)
    p.load_state_dict({names[k]: v for k, v in sd.items() if names[k] is not None})
    assert names["attn.zero_k_bias"] is None and not sd["attn.zero_k_bias"].any()


@pytest.mark.parametrize("in_dim,out_dim", [(64, 8), (8, 64), (1024, 64), (64, 1024)])
def test_official_layout_weight_copied(in_dim, out_dim):
    """Same parameter count as UniTok's AttnProjection (embed_dim // vocab_width heads) and the same
    output with the official tensors copied in: the MLP branch has its LayerNorm and the MLP's own."""
    heads = max(in_dim, out_dim) // min(in_dim, out_dim)
    torch.manual_seed(0)
    official = OfficialAttnProjection(in_dim, out_dim, heads)
    _randomize(official)
    p = AttentionProjector(AttentionConfig(), in_dim=in_dim, out_dim=out_dim)
    assert sum(t.numel() for t in p.parameters()) == sum(t.numel() for t in official.parameters())
    assert p.attn.heads == heads
    copy_official_into_vtok(official, p)
    x = torch.randn(2, 6, in_dim, dtype=torch.float64)
    torch.testing.assert_close(p.double()(x), official.double()(x), rtol=1e-9, atol=1e-9)
    # the full-scale pair: 1024 -> 64 has 3,246,784 parameters, 64 -> 1024 has 7,615,744 (UniTok's counts)
    if (in_dim, out_dim) == (1024, 64):
        assert sum(t.numel() for t in p.parameters()) == 3_246_784
    if (in_dim, out_dim) == (64, 1024):
        assert sum(t.numel() for t in p.parameters()) == 7_615_744


def test_gelu_flavour():
    """tanh (UniTok's GeGluMlp, the default) or exact erf GELU in the GeGLU gate; the two differ."""
    x = torch.linspace(-4, 4, 81)
    tanh = AttentionProjector(AttentionConfig(), in_dim=16, out_dim=4).mlp.act
    exact = AttentionProjector(AttentionConfig(gelu="exact"), in_dim=16, out_dim=4).mlp.act
    torch.testing.assert_close(tanh(x), F.gelu(x, approximate="tanh"), rtol=0, atol=0)
    torch.testing.assert_close(exact(x), F.gelu(x), rtol=0, atol=0)
    assert (tanh(x) - exact(x)).abs().max() > 1e-4


def test_unitok_init_statistics():
    """init unitok: every Linear weight ~ trunc-normal std 0.02, every Linear bias exactly 0."""
    torch.manual_seed(0)
    p = AttentionProjector(AttentionConfig(), in_dim=256, out_dim=64)
    linears = [m for m in p.modules() if isinstance(m, torch.nn.Linear)]
    w = torch.cat([m.weight.flatten() for m in linears])
    assert abs(w.std().item() - 0.02) < 0.001 and abs(w.mean().item()) < 0.001
    assert w.abs().max() <= 2.0  # trunc_normal_'s default bounds (+-2, i.e. 100 sigma: as the official call)
    assert all(m.bias is None or (m.bias == 0).all() for m in linears)
    torch_default = AttentionProjector(AttentionConfig(init="torch"), in_dim=256, out_dim=64)
    assert (torch_default.linear.bias != 0).any()  # torch's default: uniform biases
