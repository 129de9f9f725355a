"""UniTok's attention projection (replaces the linear projections before and after the quantizer).

One block (UniTok, "attention projection"; PAPERS.md section 1), laid out as FoundationVision/UniTok
``models/vqvae.py`` ``AttnProjection`` / ``PlainAttention``::

    x = Linear(in -> out)(LN3(x)) + Attn(LN1(x))         # residual linear path + attention
    x = x + GeGLU-MLP(LN2(x))                            # GeGLU-MLP = w2(gelu_tanh(w0 LN(x)) * w1 LN(x))

The GeGLU MLP (hidden ``mlp_ratio * out`` = 2 * out) has a LayerNorm of its own (eps 1e-6) in
front, so the MLP branch normalises twice, as the official block does; LN1-LN3 are torch
LayerNorms (eps 1e-5). Its GELU is the tanh approximation (``gelu: tanh``, UniTok's ``GeGluMlp`` in
``models/vitamin.py``; ``exact``: erf).

Attention: ``qkv = Linear(in, 3 * max(in, out), bias=False)`` plus learned q and v biases (k has
none). Heads: by default ``max(in, out) // min(in, out)`` -- the official rule, UniTok builds both
projections with ``embed_dim // vocab_width`` heads (``models/unitok.py``), e.g. 1024 <-> 64: 16
heads of width 64. Channel compression (in > out): heads of width ``out`` whose outputs are
AVERAGED over the head axis. Expansion (in < out) and in == out: ordinary multi-head attention with
concatenated heads (``heads`` may set another count that divides ``out``). Then ``Linear(out, out)``.
``causal: true`` is v1 of the paper and code (autoregressive use); the April-2025 code uses full
attention (``causal: false``). The attention core is ``F.scaled_dot_product_attention``; written
here because no library block averages heads.

Initialisation (``init: unitok``, default): UniTok re-initialises both projections after building
them (Linear weights truncated normal std 0.02, biases 0; see ``plugins/weight_init.py``).
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
from plugins.encoders.vit import GELU_LAYER, GeluKind
from plugins.weight_init import Init, apply_init


class AttentionConfig(ProjectorConfig):
    type: Literal["attention"] = "attention"
    heads: Optional[int] = Field(None, gt=0)  # null: max(in,out) // min(in,out), UniTok's embed_dim // vocab_width; compression always uses in/out heads of width out
    causal: bool = False  # causal attention mask (UniTok v1) instead of full attention (April-2025 code)
    mlp_ratio: float = Field(2.0, gt=0)  # GeGLU MLP hidden width / out
    gelu: GeluKind = "tanh"  # GELU of the GeGLU MLP: tanh approximation (UniTok) or exact (erf)
    init: Init = "unitok"  # unitok: trunc-normal(0.02) Linear weights, zero biases (UniTok's build); torch: layer defaults


def head_layout(in_dim: int, out_dim: int, heads: Optional[int]) -> tuple[int, int]:
    """(number of heads, head width); ConfigError when the widths do not split evenly."""
    if in_dim > out_dim:
        if in_dim % out_dim:
            raise ConfigError("out_dim", f"compression {in_dim} -> {out_dim} needs in divisible by out (heads of width out are averaged)")
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


#: UniTok's AttnProjection submodule -> this projector's (``python -m core.convert``)
UNITOK_NAMES = {"norm1": "norm_attn", "norm3": "norm_linear", "proj": "linear", "norm2": "norm_mlp", "attn": "attn", "mlp": "mlp"}


class AttentionProjector(Projector):
    """UniTok attention projection: Linear(LN x) + Attn(LN x), then + GeGLU-MLP(LN x) (MLP with its own LN)."""

    Config = AttentionConfig

    def __init__(self, cfg: AttentionConfig, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.norm_linear = nn.LayerNorm(in_dim)
        self.linear = nn.Linear(in_dim, out_dim)
        self.norm_attn = nn.LayerNorm(in_dim)
        self.attn = HeadAveragingAttention(in_dim, out_dim, cfg.heads, cfg.causal)
        self.norm_mlp = nn.LayerNorm(out_dim)
        # timm's GeGluMlp carries a LayerNorm (eps 1e-6) of its own in front, like UniTok's
        self.mlp = GeGluMlp(out_dim, int(out_dim * cfg.mlp_ratio), act_layer=GELU_LAYER[cfg.gelu])
        apply_init(self, cfg.init)

    def forward(self, x: Tensor) -> Tensor:
        x = self.linear(self.norm_linear(x)) + self.attn(self.norm_attn(x))
        return x + self.mlp(self.norm_mlp(x))

    def unitok_state_names(self) -> dict[str, Optional[str]]:
        """UniTok state-dict name -> own (None: the official constant zero k-bias buffer)."""
        official = {own: off for off, own in UNITOK_NAMES.items()}
        names: dict[str, Optional[str]] = {}
        for key in self.state_dict():
            head, rest = key.split(".", 1)
            names[f"{official[head]}.{rest}"] = key
        names["attn.zero_k_bias"] = None
        return names


@hookimpl
def register_projectors(register):
    register("attention", AttentionProjector)
