"""Procedural coloured shapes with compositional captions (no files; deterministic from a seed).

Each image holds one shape drawn from five independent attributes (shape kind, colour, size,
position, background texture). Every attribute is a zero-shot task: ``attributes`` lists its
class names, ``attribute_templates`` its prompts, and items carry ``label_<attribute>``.
``holdout`` removes attribute combinations from the train split (compositional generalisation:
e.g. never show a red circle in training, then ask the eval split for one).
"""
from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from core.hookspecs import hookimpl
from core.interfaces import Dataset, DatasetConfig

SHAPES = ["circle", "square", "triangle", "diamond", "cross", "ring"]
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
           "purple": (150, 60, 190), "orange": (240, 140, 30), "cyan": (40, 200, 210), "white": (235, 235, 235)}
SIZES = {"small": 0.14, "medium": 0.2, "large": 0.26}  # radius as a fraction of the side
POSITIONS = {"in the centre": (0.5, 0.5), "on the left": (0.28, 0.5), "on the right": (0.72, 0.5),
             "at the top": (0.5, 0.28), "at the bottom": (0.5, 0.72)}
BACKGROUNDS = ["plain", "striped", "checkered", "noisy"]
ATTRIBUTES: dict[str, list[str]] = {"shape": SHAPES, "colour": list(COLOURS), "size": list(SIZES),
                                    "position": list(POSITIONS), "background": BACKGROUNDS}
ATTRIBUTE_TEMPLATES: dict[str, list[str]] = {
    "shape": ["a {}.", "a photo of a {}.", "an image with one {}."],
    "colour": ["a {} shape.", "a photo of something {}.", "an image with one {} object."],
    "size": ["a {} shape.", "a photo of a {} object."],
    "position": ["a shape {}.", "an object {}."],
    "background": ["a shape on a {} background.", "an object in front of a {} background."],
}
CAPTIONS = [
    "a {size} {colour} {shape} {position}.",
    "a {colour} {shape} on a {background} background.",
    "a photo of a {size} {colour} {shape}.",
    "a {shape} that is {colour} and {size}, {position}.",
    "{position} there is a {colour} {shape}.",
    "an image with one {size} {colour} {shape} on a {background} background.",
]
CACHE_BYTES = 1 << 30  # per split and process: 20,000 items at 32 px take 246 MB, at 64 px 983 MB
SUPERSAMPLE = 2  # render at 2x and average 2x2 blocks: anti-aliased edges
JITTER = 0.04  # uniform jitter of the shape centre around its position


class ShapesConfig(DatasetConfig):
    type: Literal["shapes"] = "shapes"
    image_size: int = Field(32, ge=16, le=512)  # square images of this side (32-256 are the tested range)
    train_size: int = Field(20000, gt=0)  # items in the train split (and the length of the eval split)
    # attribute combinations never drawn in the train split, e.g. [{shape: circle, colour: red}]
    holdout: list[dict[str, str]] = Field(default_factory=list)
    # eval split: the full distribution ("all"), only held-out combinations ("only"), or none ("exclude")
    eval_holdout: Literal["all", "only", "exclude"] = "all"

    @property
    def provides_text(self) -> bool:
        return True

    @model_validator(mode="after")
    def _known_holdout(self) -> "ShapesConfig":
        for combo in self.holdout:
            if not combo:
                raise ValueError("holdout: an empty combination would hold out everything")
            for attr, value in combo.items():
                if attr not in ATTRIBUTES:
                    raise ValueError(f"holdout: unknown attribute '{attr}' (one of {', '.join(ATTRIBUTES)})")
                if value not in ATTRIBUTES[attr]:
                    raise ValueError(f"holdout: unknown {attr} '{value}' (one of {', '.join(ATTRIBUTES[attr])})")
        return self


def _mask(kind: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
    dx, dy = xx - cx, yy - cy
    if kind == "circle":
        return dx**2 + dy**2 <= r**2
    if kind == "ring":
        return (dx**2 + dy**2 <= r**2) & (dx**2 + dy**2 >= (0.55 * r) ** 2)
    if kind == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    if kind == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if kind == "cross":
        bar = r * 0.3
        return ((np.abs(dx) <= bar) & (np.abs(dy) <= r)) | ((np.abs(dy) <= bar) & (np.abs(dx) <= r))
    return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)  # triangle, apex up


def _background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Dark textures (channel values <= 110) so a shape's colour stays readable on them."""
    tint = rng.uniform(0, 70, size=3)
    img = np.broadcast_to(tint, (size, size, 3)).copy()
    yy, xx = np.mgrid[0:size, 0:size]
    period = max(2, size // int(rng.integers(4, 9)))
    if kind == "striped":
        coord = xx if rng.integers(2) else yy
        img[(coord // period) % 2 == 1] += 40
    elif kind == "checkered":
        img[((xx // period) + (yy // period)) % 2 == 1] += 40
    elif kind == "noisy":
        img += rng.uniform(0, 40, size=(size, size, 1))
    return img


def _matches(combo: dict[str, str], attrs: dict[str, str]) -> bool:
    return all(attrs[k] == v for k, v in combo.items())


class Shapes(Dataset):
    """One coloured shape on a textured background; label = shape kind; captions from templates."""

    Config = ShapesConfig
    class_names = SHAPES
    templates = ATTRIBUTE_TEMPLATES["shape"]
    attributes = ATTRIBUTES
    attribute_templates = ATTRIBUTE_TEMPLATES

    def __init__(self, cfg: ShapesConfig, split: str = "train", seed: int = 0, size: int | None = None) -> None:
        self.cfg, self.split, self.seed = cfg, split, seed
        self.split_id = 0 if split == "train" else 1
        self.n = size if size is not None else cfg.train_size
        # items are rendered once per process and kept (a run of 3,000 steps of 32 draws each item
        # of 20,000 about five times; rendering was ~15% of a 32 px step): float32 images exactly as
        # rendered, up to CACHE_BYTES per split, beyond which items are rendered on every draw
        side = cfg.image_size
        self._cache = {} if self.n * 3 * side * side * 4 <= CACHE_BYTES else None

    def __len__(self) -> int:
        return self.n

    def _allowed(self, attrs: dict[str, str]) -> bool:
        held = any(_matches(c, attrs) for c in self.cfg.holdout)
        if self.split == "train" or self.cfg.eval_holdout == "exclude":
            return not held
        return held if self.cfg.eval_holdout == "only" else True

    def _draw(self, rng: np.random.Generator) -> dict[str, str]:
        """Attributes drawn uniformly and independently, redrawn until the split allows them."""
        for _ in range(10000):
            attrs = {k: v[int(rng.integers(len(v)))] for k, v in ATTRIBUTES.items()}
            if not self.cfg.holdout or self._allowed(attrs):
                return attrs
        raise RuntimeError(f"shapes: no attribute combination is allowed in the {self.split} split (data.holdout)")

    def render(self, attrs: dict[str, str], rng: np.random.Generator) -> np.ndarray:
        """(H, W, 3) float image in [0, 255]."""
        s = self.cfg.image_size * SUPERSAMPLE
        r = SIZES[attrs["size"]]
        px, py = POSITIONS[attrs["position"]]
        cx, cy = rng.uniform(-JITTER, JITTER, size=2) + (px, py)
        img = _background(attrs["background"], s, rng)
        img[_mask(attrs["shape"], s, cx, cy, r)] = COLOURS[attrs["colour"]]
        return img.reshape(s // SUPERSAMPLE, SUPERSAMPLE, s // SUPERSAMPLE, SUPERSAMPLE, 3).mean(axis=(1, 3))

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        if self._cache is None:
            return self._item(i)
        item = self._cache.get(i)
        if item is None:
            item = self._cache[i] = self._item(i)
        return {**item, "image": item["image"].clone()}  # a caller may write into its batch

    def _item(self, i: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, self.split_id, i])
        attrs = self._draw(rng)
        img = self.render(attrs, rng)
        caption = CAPTIONS[int(rng.integers(len(CAPTIONS)))].format(**attrs)
        caption = caption[0].upper() + caption[1:] if rng.integers(2) else caption
        image = torch.from_numpy(img.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
        item: dict[str, Any] = {"image": image, "text": caption, "label": SHAPES.index(attrs["shape"])}
        item.update({f"label_{k}": ATTRIBUTES[k].index(v) for k, v in attrs.items()})
        return item


@hookimpl
def register_datasets(register):
    register("shapes", Shapes)
