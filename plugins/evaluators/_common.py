"""Helpers shared by the evaluators: the dataset behind a loader, the model's device, discrete features."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from core.interfaces import Dataset


def base_dataset(loader: torch.utils.data.DataLoader):
    """The vtok Dataset behind ``loader``: the trainer wraps the eval split (a ``Subset`` for map-style
    datasets, a head-of-stream wrapper with ``.dataset`` for iterable ones)."""
    ds = loader.dataset
    for _ in range(10):
        if isinstance(ds, Dataset):
            return ds
        inner = getattr(ds, "dataset", None)
        if inner is None:
            break
        ds = inner
    raise TypeError(f"no vtok Dataset behind the eval loader (found {type(ds).__name__})")


def no_autocast(device: torch.device):
    """Feature extractors run in fp32 whatever autocast the trainer evaluates the tokenizer under."""
    return torch.autocast(device_type=device.type, enabled=False)


def device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def pooled_discrete_features(model: nn.Module, images: Tensor, where: str = "post") -> Tensor:
    """Mean over tokens of the DISCRETE path: indices -> codes (``codes``) -> post-projector (``post``)."""
    codes = model.discrete_latent(images)
    feats = model.project_out(codes) if where == "post" else codes
    return feats.float().mean(dim=1)
