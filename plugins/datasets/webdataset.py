"""DataComp / WebDataset tar shards (image + caption), streamed.

A shard is a tar whose members are grouped into samples by key (the name up to the first dot of
the basename): ``000123.jpg`` + ``000123.txt`` (+ optional ``000123.cls`` / ``.json``).

Why by hand (tarfile) rather than the ``webdataset`` package: reading a tar stream and grouping
members by key is ~20 lines of stdlib, while the package's splitting and shuffling API changed
across releases; vtok needs one exact rule it can test: every sample is read exactly once per
epoch across all ranks x DataLoader workers. The rule: worker ``w`` of rank ``r`` is global
reader ``g = r * workers + w`` of ``G = world * workers``; with at least G shards, reader g
reads shards ``g, g+G, ...``; with fewer, every reader streams every shard and keeps samples
``g, g+G, ...`` of it.
"""
from __future__ import annotations

import glob
import io
import os
import re
import tarfile
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Union

import numpy as np
import torch
from PIL import Image
from pydantic import Field

from core.errors import ConfigError
from core.hookspecs import hookimpl
from core.interfaces import Dataset, DatasetConfig
from plugins.datasets._image import DECODE_ERRORS, bad_file, image_transform

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTS = ("txt", "caption")
BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


class WebDatasetConfig(DatasetConfig):
    type: Literal["webdataset"] = "webdataset"
    image_size: int = Field(256, ge=8, le=1024)  # side of the square crops
    shards: Union[str, list[str]]  # shard paths; "{000..099}" ranges and glob patterns are expanded
    eval_shards: Optional[Union[str, list[str]]] = None  # shards of the eval split (default: the last shard, then not trained on)
    shuffle_buffer: int = Field(1000, ge=0)  # train split: samples held in the shuffle buffer (0: off)
    crop_scale: tuple[float, float] = (0.8, 1.0)  # RandomResizedCrop area range (train split)
    crop_ratio: float = Field(0.875, gt=0, le=1)  # eval: resize to size / ratio, then centre crop
    class_names: list[str] = Field(default_factory=list)  # names of the ``.cls`` labels (enables zero-shot, fd_refnet)
    on_corrupt: Literal["fail", "skip"] = "fail"  # an undecodable sample or shard: stop naming it, or skip it with a warning

    @property
    def provides_text(self) -> bool:
        return True


def expand_shards(spec: Union[str, list[str]]) -> list[str]:
    """``"d/{00..02}.tar"`` -> ``["d/00.tar", "d/01.tar", "d/02.tar"]`` (zero padding kept); then glob."""
    out: list[str] = []
    for item in [spec] if isinstance(spec, str) else spec:
        m = BRACE.search(item)
        if m:
            lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
            out += expand_shards([item[: m.start()] + str(i).zfill(width) + item[m.end():] for i in range(lo, hi + 1)])
        elif any(c in item for c in "*?["):
            out += sorted(glob.glob(item))
        else:
            out.append(item)
    return out


def read_shard(path: str) -> Iterator[dict[str, bytes]]:
    """Samples of one tar shard, in order: ``{"__key__": key, ext: bytes, ...}``."""
    current: dict[str, Any] = {}
    with tarfile.open(path, mode="r|*") as tar:  # a stream: works on pipes and large files
        for member in tar:
            if not member.isfile():
                continue
            name = Path(member.name)
            key, _, ext = name.name.partition(".")
            key = str(name.parent / key)
            if current and current["__key__"] != key:
                yield current
                current = {}
            current["__key__"] = key
            current[ext.lower()] = tar.extractfile(member).read()
    if current:
        yield current


def rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class WebDataset(Dataset, torch.utils.data.IterableDataset):
    """Streamed tar shards of (image, caption); split across ranks and DataLoader workers."""

    Config = WebDatasetConfig

    def __init__(self, cfg: WebDatasetConfig, split: str = "train", seed: int = 0) -> None:
        self.cfg, self.split, self.seed = cfg, split, seed
        shards = expand_shards(cfg.shards)
        if cfg.eval_shards is None and len(shards) > 1:  # the last shard is the eval split: not trained on
            shards = shards[:-1] if split == "train" else shards[-1:]
        elif cfg.eval_shards is None:
            raise ConfigError("data.eval_shards", "one shard in data.shards: the default eval split (the last shard) "
                                                  "would be the training data; give eval_shards or more shards")
        elif split != "train":
            shards = expand_shards(cfg.eval_shards)
        missing = [s for s in shards if not os.path.isfile(s)]
        if not shards or missing:
            raise ConfigError("data.shards" if split == "train" else "data.eval_shards",
                              f"shard {missing[0]} not found" if missing else "no shard matches")
        self.shards = shards
        self.class_names = list(cfg.class_names)
        self.epoch = 0
        self.transform = image_transform(cfg.image_size, split == "train", cfg.crop_scale, cfg.crop_ratio)

    def set_epoch(self, epoch: int) -> None:
        """Train split: reshuffles shard order and buffer per epoch (call before iterating)."""
        self.epoch = epoch

    def _reader(self) -> tuple[int, int]:
        rank, world = rank_and_world()
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * nw + wid, world * nw

    def _raw(self) -> Iterator[dict[str, bytes]]:
        g, total = self._reader()
        order = list(range(len(self.shards)))
        if self.split == "train":
            np.random.default_rng([self.seed, self.epoch]).shuffle(order)
        if len(order) >= total:
            for s in order[g::total]:
                yield from self._read(self.shards[s])
            return
        for s in order:
            for j, sample in enumerate(self._read(self.shards[s])):
                if j % total == g:
                    yield sample

    def _read(self, shard: str) -> Iterator[dict[str, bytes]]:
        """The shard's samples, each tagged with its shard; a damaged tar is reported by name."""
        try:
            for sample in read_shard(shard):
                sample["__shard__"] = shard
                yield sample
        except (tarfile.TarError, OSError, EOFError) as e:
            bad_file(shard, e, self.cfg.on_corrupt)

    def _shuffled(self, samples: Iterator[dict[str, bytes]]) -> Iterator[dict[str, bytes]]:
        size = self.cfg.shuffle_buffer if self.split == "train" else 0
        if size <= 1:
            yield from samples
            return
        g, _ = self._reader()
        rng = np.random.default_rng([self.seed, self.epoch, g])
        buf: list[dict[str, bytes]] = []
        for s in samples:
            if len(buf) < size:
                buf.append(s)
                continue
            k = int(rng.integers(size))
            yield buf[k]
            buf[k] = s
        rng.shuffle(buf)
        yield from buf

    def decode(self, sample: dict[str, bytes]) -> dict[str, Any] | None:
        img_ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if img_ext is None:
            return None  # a sample without an image (e.g. a stray metadata file) is skipped
        try:
            with Image.open(io.BytesIO(sample[img_ext])) as img:
                image = self.transform(img)
            txt_ext = next((e for e in TEXT_EXTS if e in sample), None)
            text = sample[txt_ext].decode("utf-8").strip() if txt_ext else ""
            label = int(sample["cls"].decode().strip()) if "cls" in sample else -1
        except DECODE_ERRORS as e:  # UnicodeDecodeError and a non-integer label are ValueErrors
            bad_file(f"{sample.get('__shard__', '?')}:{sample['__key__']}", e, self.cfg.on_corrupt)
            return None
        return {"image": image, "text": text, "label": label, "key": sample["__key__"]}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for sample in self._shuffled(self._raw()):
            item = self.decode(sample)
            if item is not None:
                yield item


@hookimpl
def register_datasets(register):
    register("webdataset", WebDataset)
