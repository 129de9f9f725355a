"""UniTok's attention projection (replaces the linear projections before and after the quantizer).

One block (UniTok, "attention projection"; PAPERS.md section 1)::

    x = Linear(in -> out)(LN(x)) + Attn(LN(x))          # residual linear path + attention
    x = x + GeGLU-MLP(LN(x))                             # hidden 2 * out

Attention: ``qkv = Linear(in, 3 * max(in, out), bias=False)`` plus learned q and v biases (k has
none), split into heads of width ``min(in, out)`` (``max / min`` heads; ``heads`` overrides the
count when in <= out). Channel compression (in > out): the head outputs are AVERAGED over the head
axis (head width = out), e.g. 1024 -> 64 with 16 heads. Expansion (in < out) and in == out:
ordinary multi-head attention with concatenated heads. Then ``Linear(out, out)``.
``causal: true`` is v1 of the paper and code (autoregressive use); the April-2025 code uses full
attention (``causal: false``). Each path has its own LayerNorm. The attention core is
``F.scaled_dot_product_attention``; written here because no library block averages heads.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from timm.models.vitamin import GeGluMlp
from torch import Tensor, nn

from core.errors import ConfigError
from core.hookspecs import hookimpl
from core.interfaces import Projector, ProjectorConfig


class AttentionConfig(ProjectorConfig):
    type: Literal["attention"] = "attention"
    heads: Optional[int] = Field(None, gt=0)  # heads when in <= out (default max/min); compression always uses in/out heads of width out
    causal: bool = False  # causal attention mask (UniTok v1) instead of full attention (April-2025 code)
    mlp_ratio: float = Field(2.0, gt=0)  # GeGLU MLP hidden width / out


def head_layout(in_dim: int, out_dim: int, heads: Optional[int]) -> tuple[int, int]:
    """(number of heads, head width); ConfigError when the widths do not split evenly."""
    if in_dim > out_dim:
        if in_dim % out_dim:
            raise ConfigError("out", f"compression {in_dim} -> {out_dim} needs in divisible by out (heads of width out are averaged)")
        if heads is not None and heads != in_dim // out_dim:
            raise ConfigError("heads", f"compression {in_dim} -> {out_dim} uses {in_dim // out_dim} heads of width {out_dim}, got {heads}")
        return in_dim // out_dim, out_dim
    n = heads if heads is not None else out_dim // in_dim
    if out_dim % n:
        raise ConfigError("heads", f"{n} heads do not divide the width {out_dim}")
    return n, out_dim // n


class HeadAveragingAttention(nn.Module):
    """Multi-head attention whose heads are averaged (compression) or concatenated (otherwise)."""

    def __init__(self, in_dim: int, out_dim: int, heads: Optional[int], causal: bool) -> None:
        super().__init__()
        self.heads, self.head_dim = head_layout(in_dim, out_dim, heads)
        self.average = in_dim > out_dim
        self.causal = causal
        inner = max(in_dim, out_dim)
        self.qkv = nn.Linear(in_dim, 3 * inner, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(inner))
        self.v_bias = nn.Parameter(torch.zeros(inner))
        self.proj = nn.Linear(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).view(b, n, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        o = o.mean(dim=1) if self.average else o.transpose(1, 2).reshape(b, n, -1)
        return self.proj(o)


class AttentionProjector(Projector):
    """UniTok attention projection: Linear(LN x) + Attn(LN x), then + GeGLU-MLP(LN x)."""

    Config = AttentionConfig

    def __init__(self, cfg: AttentionConfig, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.norm_linear = nn.LayerNorm(in_dim)
        self.linear = nn.Linear(in_dim, out_dim)
        self.norm_attn = nn.LayerNorm(in_dim)
        self.attn = HeadAveragingAttention(in_dim, out_dim, cfg.heads, cfg.causal)
        # GeGluMlp carries its own LayerNorm in front: x + mlp(x) is x + GeGLU(LN(x))
        self.mlp = GeGluMlp(out_dim, int(out_dim * cfg.mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = self.linear(self.norm_linear(x)) + self.attn(self.norm_attn(x))
        return x + self.mlp(x)


@hookimpl
def register_projectors(register):
    register("attention", AttentionProjector)
