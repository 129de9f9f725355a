"""Linear projection (UniTok's baseline before and after the quantizer)."""
from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from core.hookspecs import hookimpl
from core.interfaces import Projector, ProjectorConfig


class LinearConfig(ProjectorConfig):
    type: Literal["linear"] = "linear"
    bias: bool = True  # learn an additive bias


class LinearProjector(Projector):
    """Plain Linear(in -> out)."""

    Config = LinearConfig

    def __init__(self, cfg: LinearConfig, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.proj = nn.Linear(in_dim, out_dim, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


@hookimpl
def register_projectors(register):
    register("linear", LinearProjector)
