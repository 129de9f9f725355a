"""Fashion-MNIST read from its IDX files (Xiao et al. 2017): 60k train / 10k test, 10 classes.

Greyscale 28x28 images are replicated to RGB and resized (bilinear, antialiased) to
``image_size``; captions are a class name in a template, drawn deterministically per item.
"""
from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from core.errors import ConfigError
from core.hookspecs import hookimpl
from core.interfaces import Dataset, DatasetConfig

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
CLASS_NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
TEMPLATES = ["a photo of a {}.", "a black and white photo of a {}.", "a low resolution photo of a {}.",
             "a product photo of a {}.", "a grey picture of a {}."]
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "eval": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class FashionMnistConfig(DatasetConfig):
    type: Literal["fashion_mnist"] = "fashion_mnist"
    image_size: int = Field(32, ge=8, le=512)  # side after resizing from 28x28
    # directory holding the four IDX files (plain or .gz); default: $VTOK_FASHION_MNIST or Debian's path
    root: str = Field(default_factory=lambda: os.environ.get("VTOK_FASHION_MNIST", DEFAULT_ROOT))

    @property
    def provides_text(self) -> bool:
        return True


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (LeCun's format): 2 zero bytes, a dtype byte, ndim byte, big-endian int32 dims, data.

    Read once per process and file version (path, size, mtime): a run builds its train and eval
    splits more than once, and decompressing the 26 MB of train images costs about 0.4 s each time.
    The arrays are read-only views, so sharing them is safe."""
    st = path.stat()
    return _read_idx(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _read_idx(name: str, size: int, mtime_ns: int) -> np.ndarray:
    path = Path(name)
    data = (gzip.decompress if path.suffix == ".gz" else bytes)(path.read_bytes())
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise ConfigError(str(path), "not an IDX file (bad magic number)")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">i4", count=ndim, offset=4)
    arr = np.frombuffer(data, dtype=IDX_DTYPES[data[2]], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ConfigError(str(path), f"truncated IDX file: {arr.size} values for shape {tuple(dims)}")
    return arr.reshape(tuple(int(d) for d in dims))


def _find(root: Path, name: str) -> Path:
    for cand in (root / name, root / f"{name}.gz"):
        if cand.is_file():
            return cand
    raise ConfigError("data.root", f"{root / name}[.gz] not found: install the Debian package dataset-fashion-mnist "
                      "(apt-get install dataset-fashion-mnist) or put the four IDX files from "
                      "github.com/zalandoresearch/fashion-mnist in that directory")


class FashionMnist(Dataset):
    """Fashion-MNIST from local IDX files; label = class index; captions from class-name templates."""

    Config = FashionMnistConfig
    class_names = CLASS_NAMES
    templates = TEMPLATES

    def __init__(self, cfg: FashionMnistConfig, split: str = "train", seed: int = 0) -> None:
        self.cfg, self.split, self.seed = cfg, split, seed
        root = Path(cfg.root)
        if not root.is_dir():
            _find(root, FILES["train"][0])  # raises the one-line how-to-get-it error
        img_file, lbl_file = FILES["train" if split == "train" else "eval"]
        self.images = read_idx(_find(root, img_file))
        self.labels = read_idx(_find(root, lbl_file)).astype(np.int64)
        if self.images.ndim != 3 or len(self.images) != len(self.labels):
            raise ConfigError("data.root", f"{img_file}: expected N x H x W images matching {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        img = torch.from_numpy(self.images[i].astype(np.float32))[None, None] / 127.5 - 1
        s = self.cfg.image_size
        if img.shape[-1] != s or img.shape[-2] != s:
            img = F.interpolate(img, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        label = int(self.labels[i])
        rng = np.random.default_rng([self.seed, i])
        text = TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(CLASS_NAMES[label])
        return {"image": img[0].expand(3, s, s).clamp(-1, 1).contiguous(), "text": text, "label": label}


@hookimpl
def register_datasets(register):
    register("fashion_mnist", FashionMnist)
