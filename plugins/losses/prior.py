"""Generative-Aware Prior (UniWeTok GAP): a tiny next-token diffusion model on the quantized tokens.

The quantized latents ``U_Q`` (``outputs["zq"]``, ``(B, N, D)`` in raster order) are read by a small
randomly initialised causal transformer; the hidden state at position i conditions a per-token
diffusion head that predicts token i from ``[Query, U_Q[:-1]]`` (with the learned query token the
first token is predicted too; without it the sequence is ``U_Q[:-1]`` predicting ``U_Q[1:]``).
Diffusion as in BitDance: ``t = sigmoid(N(-0.8, 0.8))``, ``z_t = (1 - t) eps + t x``, the head
predicts x, and the loss is ``mean((v - v_hat)^2)`` with ``v = (x - z_t) / max(1 - t, 0.05)``.
The loss (term ``next_token``, also the cheap "generation-friendliness" metric) backpropagates
into the tokenizer; the loss weight is mu. The prior's parameters join the main optimizer.
"""
from __future__ import annotations

import math
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from core.hookspecs import hookimpl
from core.interfaces import Loss, LossConfig, LossResult


class PriorConfig(LossConfig):
    type: Literal["prior"] = "prior"
    width: int = Field(64, gt=0)  # transformer width
    depth: int = Field(2, gt=0)  # transformer layers
    heads: int = Field(4, gt=0)  # attention heads (must divide width)
    head_width: int = Field(128, gt=0)  # hidden width of the per-token diffusion MLP
    head_depth: int = Field(2, gt=0)  # hidden layers of the diffusion MLP
    query: bool = True  # learned query token in front (UniWeTok Table 5: needed)
    t_mean: float = -0.8  # logit-normal time: t = sigmoid(N(t_mean, t_std)) (BitDance)
    t_std: float = Field(0.8, gt=0)
    min_one_minus_t: float = Field(0.05, gt=0, le=1)  # clamp of (1 - t) in the v-loss (BitDance)


def time_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000 as in DDPM) -> ``(..., dim)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    ang = 1000.0 * t.float()[..., None] * freqs
    emb = torch.cat([ang.sin(), ang.cos()], dim=-1)
    return F.pad(emb, (0, dim - 2 * half))


def v_loss(x: Tensor, x_hat: Tensor, z: Tensor, t: Tensor, min_one_minus_t: float) -> Tensor:
    """Per-token ``mean_c (v - v_hat)^2`` with ``v = (x - z) / max(1 - t, c)``: ``(B, M)``."""
    denom = (1 - t).clamp_min(min_one_minus_t)
    v, v_hat = (x - z) / denom, (x_hat - z) / denom
    return (v - v_hat).pow(2).mean(dim=-1)


class DiffusionHead(nn.Module):
    """Per-token MLP: ``[z_t, h, emb(t)] -> x_hat``. Written by hand: no library offers a per-token
    conditional denoiser this small."""

    def __init__(self, dim: int, cond: int, hidden: int, depth: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(dim + 2 * cond, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, dim))
        self.net = nn.Sequential(*layers)
        self.cond = cond

    def forward(self, z: Tensor, h: Tensor, t: Tensor) -> Tensor:
        return self.net(torch.cat([z, h, time_embedding(t[..., 0], self.cond)], dim=-1))


class PriorLoss(Loss):
    """GAP: next-token diffusion loss on the quantized tokens (term ``next_token``). Reads the output
    ``zq`` only; the latent width and token count come from the model at build time (not kept)."""

    Config = PriorConfig

    def __init__(self, cfg: PriorConfig, model: Any = None, dim: Optional[int] = None, n_tokens: Optional[int] = None) -> None:
        super().__init__()
        self.cfg = cfg
        dim = dim or model.spec.quantizer.latent_dim
        n_tokens = n_tokens or model.grid[0] * model.grid[1]
        self.in_proj = nn.Linear(dim, cfg.width)
        self.query = nn.Parameter(torch.randn(1, 1, cfg.width) * 0.02) if cfg.query else None
        self.pos = nn.Parameter(torch.randn(1, n_tokens, cfg.width) * 0.02)
        layer = nn.TransformerEncoderLayer(cfg.width, cfg.heads, 4 * cfg.width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.width)
        self.head = DiffusionHead(dim, cfg.width, cfg.head_width, cfg.head_depth)

    def condition(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Causal hidden states and the tokens they predict: ``(B, M, W), (B, M, D)`` with M = N
        (query on) or N - 1 (query off: the first token gets no prediction)."""
        seq = self.in_proj(x[:, :-1])
        if self.query is not None:
            seq, target = torch.cat([self.query.expand(x.shape[0], -1, -1), seq], dim=1), x
        else:
            target = x[:, 1:]
        m = seq.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(m, device=x.device)
        h = self.transformer(seq + self.pos[:, :m], mask=mask, is_causal=True)
        return self.norm(h), target

    def per_token_loss(self, x: Tensor, t: Optional[Tensor] = None, eps: Optional[Tensor] = None) -> Tensor:
        """``(B, M)`` v-losses of the predicted tokens (t and eps drawn when not given)."""
        h, target = self.condition(x)
        if t is None:
            t = torch.sigmoid(torch.randn(*target.shape[:2], 1, device=x.device) * self.cfg.t_std + self.cfg.t_mean)
        if eps is None:
            eps = torch.randn_like(target)
        z = (1 - t) * eps + t * target
        return v_loss(target, self.head(z, h, t), z, t, self.cfg.min_one_minus_t)

    def forward(self, batch: dict[str, Any], outputs: dict[str, Any], step: int) -> LossResult:
        with torch.autocast(device_type=outputs["zq"].device.type, enabled=False):  # tiny model: fp32
            return LossResult({"next_token": self.per_token_loss(outputs["zq"].float()).mean()})


@hookimpl
def register_losses(register):
    register("prior", PriorLoss)
