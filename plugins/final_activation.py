"""The last op of every encoder: ``final_activation: none | siglu | tanh`` (shared by all encoders).

SigLu (UniWeTok): ``SigLu(x) = (1 - e^x) / (1 + e^x)`` bounds the latent to [-1, 1] so the
lookup-free quantizer's sign is taken of a bounded value; UniWeTok then drops the commitment loss.
SigLu(x) = -tanh(x / 2) exactly, which is how it is computed (no overflow of e^x for large x).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

#: the config field type every encoder uses for ``final_activation``
FinalActivation = Literal["none", "siglu", "tanh"]


def siglu(x: Tensor) -> Tensor:
    """(1 - e^x) / (1 + e^x), computed as -tanh(x/2) (same function, stable for |x| large)."""
    return -torch.tanh(x / 2)


class SigLu(nn.Module):
    """UniWeTok's SigLu as a module (see :func:`siglu`)."""

    def forward(self, x: Tensor) -> Tensor:
        return siglu(x)


def make_final_activation(name: str) -> nn.Module:
    """The module for a ``final_activation`` config value."""
    return {"none": nn.Identity, "siglu": SigLu, "tanh": nn.Tanh}[name]()
