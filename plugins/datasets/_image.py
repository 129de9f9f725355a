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


# errors PIL raises for a file it cannot decode (truncated, not an image, a decompression bomb)
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def bad_file(name: str, err: BaseException, on_corrupt: str) -> None:
    """A file that cannot be decoded: raise DataError naming it (``on_corrupt="fail"``), or warn
    naming it (``"skip"``) and let the caller move on."""
    import sys

    from core.errors import DataError

    what = f"{name}: cannot decode ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no detail'})"
    if on_corrupt == "fail":
        raise DataError(f"{what}; data.on_corrupt=skip skips such files with a warning")
    if name not in _WARNED:  # once per file, not once per epoch
        _WARNED.add(name)
        print(f"vtok: warning: skipping {what}", file=sys.stderr)


_WARNED: set[str] = set()
