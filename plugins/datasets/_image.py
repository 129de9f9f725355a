"""Shared by image_folder and webdataset: PIL image -> (3, H, W) tensor in [-1, 1], ImageNet-style crops.

Train: RandomResizedCrop (scale range from the config) + horizontal flip; eval: resize the shorter
side to ``size / crop_ratio`` then CentreCrop (the ImageNet evaluation convention, ratio 0.875).
"""
from __future__ import annotations

from typing import Callable

import torch
from PIL import Image
from torchvision import transforms as T


def image_transform(size: int, train: bool, scale: tuple[float, float], crop_ratio: float) -> Callable[[Image.Image], torch.Tensor]:
    if train:
        ops = [T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
               T.RandomHorizontalFlip()]
    else:
        ops = [T.Resize(round(size / crop_ratio), interpolation=T.InterpolationMode.BICUBIC, antialias=True),
               T.CenterCrop(size)]
    ops += [T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)]
    tf = T.Compose(ops)
    return lambda img: tf(img.convert("RGB")).clamp(-1, 1)  # bicubic overshoots [0, 1] slightly
