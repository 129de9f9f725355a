"""ImageNet-layout class folders: ``root/<split dir>/<class>/<image>``, with optional captions.

Class names come from the folder names (underscores as spaces), or from ``class_names_file``
(lines ``folder<TAB>name``, e.g. WordNet ids to ImageNet names). Captions: a ``captions`` file of
lines ``relative/path<TAB>caption`` (paths relative to the split dir); items without one get
a class-name template. Crops as in ImageNet tokenizer training: random-resized-crop + flip for
training, resize + centre crop for evaluation (plugins/datasets/_image.py); the papers do not
state the crop scale range, so it is a config field.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
from PIL import Image
from pydantic import Field

from core.errors import ConfigError, DataError
from core.hookspecs import hookimpl
from core.interfaces import Dataset, DatasetConfig
from plugins.datasets._image import DECODE_ERRORS, bad_file, image_transform

EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".gif", ".tif", ".tiff"}
TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "an image of a {}."]


class ImageFolderConfig(DatasetConfig):
    type: Literal["image_folder"] = "image_folder"
    image_size: int = Field(256, ge=8, le=1024)  # side of the square crops
    root: str  # dataset directory holding the split directories
    train_dir: str = "train"  # split directory used for split="train"
    eval_dir: str = "val"  # split directory used for split="eval"
    class_names_file: Optional[str] = None  # lines "folder<TAB>class name"; default: folder names
    captions: Optional[str] = None  # lines "relative/path<TAB>caption"; default: class-name templates
    # "imagenet": the 1000 sorted WordNet folders get open_clip's ImageNet class names and OpenAI's
    # 80 zero-shot templates (how the papers' zero-shot ImageNet accuracy is measured)
    prompts: Literal["folders", "imagenet"] = "folders"
    crop_scale: tuple[float, float] = (0.8, 1.0)  # RandomResizedCrop area range (train split)
    crop_ratio: float = Field(0.875, gt=0, le=1)  # eval: resize to size / ratio, then centre crop
    on_corrupt: Literal["fail", "skip"] = "fail"  # an undecodable image: stop the run naming it, or skip it with a warning

    @property
    def provides_text(self) -> bool:
        return True


def _read_tsv(path: str, where: str) -> dict[str, str]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(where, f"{path} not found")
    rows = [line.split("\t", 1) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    bad = [i + 1 for i, r in enumerate(rows) if len(r) != 2]
    if bad:
        raise ConfigError(where, f"{path} line {bad[0]}: expected 'key<TAB>value'")
    return {k.strip(): v.strip() for k, v in rows}


def imagenet_prompts(n_folders: int) -> tuple[list[str], list[str]]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    if n_folders != len(IMAGENET_CLASSNAMES):
        raise ConfigError("data.prompts", f"'imagenet' needs the 1000 ImageNet class folders, found {n_folders}")
    return list(IMAGENET_CLASSNAMES), [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]


class ImageFolder(Dataset):
    """Class-folder images (ImageNet layout); label = sorted folder index; optional captions."""

    Config = ImageFolderConfig
    templates = TEMPLATES

    def __init__(self, cfg: ImageFolderConfig, split: str = "train", seed: int = 0) -> None:
        self.cfg, self.split, self.seed = cfg, split, seed
        self.dir = Path(cfg.root) / (cfg.train_dir if split == "train" else cfg.eval_dir)
        if not self.dir.is_dir():
            raise ConfigError("data.root", f"{self.dir} is not a directory (expected root/<split>/<class>/<image>)")
        folders = sorted(d.name for d in self.dir.iterdir() if d.is_dir())
        if not folders:
            raise ConfigError("data.root", f"{self.dir} has no class folders")
        names = _read_tsv(cfg.class_names_file, "data.class_names_file") if cfg.class_names_file else {}
        self.class_names = [names.get(f, f.replace("_", " ")) for f in folders]
        if cfg.prompts == "imagenet":
            self.class_names, self.templates = imagenet_prompts(len(folders))
        self.samples = [(p, label) for label, f in enumerate(folders)
                        for p in sorted((self.dir / f).rglob("*")) if p.suffix.lower() in EXTENSIONS]
        if not self.samples:
            raise ConfigError("data.root", f"no images under {self.dir}")
        self.captions = _read_tsv(cfg.captions, "data.captions") if cfg.captions else {}
        self.transform = image_transform(cfg.image_size, split == "train", cfg.crop_scale, cfg.crop_ratio)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        # on_corrupt=skip: an undecodable file is replaced by the next decodable one (warning names it)
        for k in range(len(self.samples)):
            j = (i + k) % len(self.samples)
            try:
                return self._item(j)
            except DECODE_ERRORS as e:
                bad_file(str(self.samples[j][0]), e, self.cfg.on_corrupt)
        raise DataError(f"{self.dir}: no image can be decoded")

    def _item(self, i: int) -> dict[str, Any]:
        path, label = self.samples[i]
        with Image.open(path) as img:
            image = self.transform(img)
        text = self.captions.get(path.relative_to(self.dir).as_posix())
        if text is None:
            rng = np.random.default_rng([self.seed, i])
            text = TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(self.class_names[label])
        return {"image": image, "text": text, "label": label}


@hookimpl
def register_datasets(register):
    register("image_folder", ImageFolder)
