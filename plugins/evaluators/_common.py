"""Helpers shared by the evaluators: the dataset behind a loader, the model's device, discrete features."""
from __future__ import annotations

import torch
from torch import Tensor, nn


def base_dataset(loader: torch.utils.data.DataLoader):
    """The vtok Dataset behind ``loader`` (the trainer may wrap the eval split in a ``Subset``)."""
    ds = loader.dataset
    while isinstance(ds, torch.utils.data.Subset):
        ds = ds.dataset
    return ds


def device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def pooled_discrete_features(model: nn.Module, images: Tensor, where: str = "post") -> Tensor:
    """Mean over tokens of the DISCRETE path: indices -> codes (``codes``) -> post-projector (``post``)."""
    codes = model.quantizer.indices_to_codes(model.encode(images))
    feats = model.project_out(codes) if where == "post" else codes
    return feats.float().mean(dim=1)
