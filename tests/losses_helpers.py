"""Tiny models and batches shared by the tests of the loss plugins (tests/test_losses_*.py)."""
from __future__ import annotations

from typing import Any

import torch

from core.config import validate
from core.model import Tokenizer


def tiny_exp(losses: list[dict] | None = None, text: bool = False, quantizer: dict | None = None, **extra: Any):
    data = {
        "name": "tiny_losses",
        "data": {"type": "shapes", "image_size": 16},
        "model": {
            "encoder": {"type": "conv", "width": 8, "downsample": 4},
            "quantizer": quantizer or {"type": "vq", "codebook_size": 32, "code_dim": 8},
            "decoder": {"type": "conv", "width": 8},
        },
        "losses": losses or [{"type": "pixel"}],
    }
    if text:
        data["model"]["text"] = {"width": 32, "depth": 1, "heads": 2, "context_length": 16}
    data.update(extra)
    return validate(data)


def tiny_model(text: bool = False, quantizer: dict | None = None, seed: int = 0) -> Tokenizer:
    torch.manual_seed(seed)
    exp = tiny_exp(text=text, quantizer=quantizer)
    return Tokenizer(exp.model, exp.data.image_size)


def images(b: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


def total_loss(loss, batch, outputs, step: int) -> torch.Tensor:
    """What the trainer minimises for one loss: sum of weighted terms times the schedule."""
    terms = loss(batch, outputs, step).terms  # metrics never count
    w = loss.term_weights()
    return loss.schedule(step) * sum(w.get(k, 1.0) * v for k, v in terms.items())
