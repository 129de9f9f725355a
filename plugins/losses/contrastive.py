"""CLIP contrastive loss (UniTok: lambda_contra = 1): symmetric InfoNCE through open_clip's ClipLoss.

``L = (CE(s * I T^T, diag) + CE(s * T I^T, diag)) / 2`` with ``s = exp(clamped logit scale)``, on the
model's l2-normalised image embedding (``outputs["image_embed"]``, CLIP head on the post tokens)
and its text tower. Under torch.distributed, features are gathered from every rank (with
gradients) so the negatives span the global batch.
"""
from __future__ import annotations

from typing import Any, Literal

import torch.distributed as dist
from torch import Tensor

from core.hookspecs import hookimpl
from core.interfaces import Loss, LossConfig


class ContrastiveConfig(LossConfig):
    type: Literal["contrastive"] = "contrastive"


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ContrastiveLoss(Loss):
    """Image-text InfoNCE over the (global) batch (term ``clip``)."""

    Config = ContrastiveConfig
    needs = frozenset({"text"})

    def __init__(self, cfg: ContrastiveConfig, model: Any = None) -> None:
        super().__init__()
        self.cfg = cfg
        # the text tower and logit scale belong to the model (they are trained with it)
        self._model = (model,)

    def forward(self, batch: dict[str, Any], outputs: dict[str, Any], step: int) -> dict[str, Tensor]:
        from open_clip.loss import ClipLoss

        model = self._model[0]
        image = outputs["image_embed"].float()
        text = model.encode_text(list(batch["text"])).float()
        rank, world = _rank_world()  # read at call time: the trainer may init the process group late
        loss = ClipLoss(gather_with_grad=True, rank=rank, world_size=world)
        return {"clip": loss(image, text, model.clamped_logit_scale().float().exp())}


@hookimpl
def register_losses(register):
    register("contrastive", ContrastiveLoss)
