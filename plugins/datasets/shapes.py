"""Procedural coloured shapes with compositional captions (no files; deterministic from a seed)."""
from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from core.hookspecs import hookimpl
from core.interfaces import Dataset, DatasetConfig

SHAPES = ["circle", "square", "triangle", "diamond"]
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
           "purple": (150, 60, 190), "orange": (240, 140, 30)}
SIZES = {"small": 0.22, "large": 0.38}
TEMPLATES = ["a {size} {colour} {shape}.", "a photo of a {colour} {shape}.", "a {shape} that is {colour} and {size}.",
             "an image with one {size} {colour} {shape}."]


class ShapesConfig(DatasetConfig):
    type: Literal["shapes"] = "shapes"
    image_size: int = Field(32, ge=16, le=512)  # square images of this side
    train_size: int = Field(20000, gt=0)  # items in the train split (eval uses train.eval_size)

    @property
    def provides_text(self) -> bool:
        return True


def _mask(kind: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
    dx, dy = xx - cx, yy - cy
    if kind == "circle":
        return dx**2 + dy**2 <= r**2
    if kind == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    if kind == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)  # triangle, apex up


class Shapes(Dataset):
    """One coloured shape on a tinted background; label = shape kind; captions from templates."""

    Config = ShapesConfig
    class_names = SHAPES
    templates = ["a {}.", "a photo of a {}.", "an image with one {}."]

    def __init__(self, cfg: ShapesConfig, split: str = "train", seed: int = 0, size: int | None = None) -> None:
        self.cfg = cfg
        self.split_id = 0 if split == "train" else 1
        self.seed = seed
        self.n = size if size is not None else cfg.train_size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, self.split_id, i])
        s = self.cfg.image_size
        label = int(rng.integers(len(SHAPES)))
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        size = list(SIZES)[rng.integers(len(SIZES))]
        r = SIZES[size]
        cx, cy = rng.uniform(r, 1 - r, size=2)
        bg = rng.uniform(0, 70, size=3)
        img = np.broadcast_to(bg, (s, s, 3)).copy()
        img[_mask(SHAPES[label], s, cx, cy, r)] = COLOURS[colour]
        caption = TEMPLATES[rng.integers(len(TEMPLATES))].format(size=size, colour=colour, shape=SHAPES[label])
        image = torch.from_numpy(img.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
        return {"image": image, "text": caption, "label": label}


@hookimpl
def register_datasets(register):
    register("shapes", Shapes)
