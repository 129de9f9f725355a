"""CLIP contrastive loss (UniTok: lambda_contra = 1): symmetric InfoNCE through open_clip's ClipLoss.

``L = (CE(s * I T^T, diag) + CE(s * T I^T, diag)) / 2`` with ``s = exp(logit scale)``, read from the
model's outputs only: ``image_embed`` (the CLIP head on the post tokens, l2-normalised),
``text_embed`` (the text tower on the batch's captions, l2-normalised) and ``logit_scale`` (the
clamped log scale, gradient straight through); the model's forward puts the last two there because
this loss ``needs`` text. Under torch.distributed, features are gathered from every rank (with
gradients) so the negatives span the global batch.
"""
from __future__ import annotations

from typing import Any, Literal

import torch.distributed as dist

from core.hookspecs import hookimpl
from core.interfaces import Loss, LossConfig, LossResult


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
        self.cfg = cfg  # the text tower and logit scale belong to the model: read through the outputs

    def forward(self, batch: dict[str, Any], outputs: dict[str, Any], step: int) -> LossResult:
        from open_clip.loss import ClipLoss

        if "text_embed" not in outputs:
            raise KeyError("contrastive loss: the outputs have no text_embed "
                           "(the model needs model.text and forward(images, texts) the batch's captions)")
        image, text = outputs["image_embed"].float(), outputs["text_embed"].float()
        rank, world = _rank_world()  # read at call time: the trainer may init the process group late
        loss = ClipLoss(gather_with_grad=True, rank=rank, world_size=world)
        return LossResult({"clip": loss(image, text, outputs["logit_scale"].float().exp())})


@hookimpl
def register_losses(register):
    register("contrastive", ContrastiveLoss)
