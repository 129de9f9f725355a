"""Contract over EVERY registered dataset (core/interfaces.py ``Dataset``): items are dicts with
``image`` float32 (3, S, S) in [-1, 1], ``text`` a non-empty str when ``Config.provides_text``,
``label`` an int in range(len(class_names)) when the dataset has class names (-1 allowed where the
plugin documents unlabeled samples), ``label_<attribute>`` for each declared attribute; the same
(config, split, seed) gives the same items; train and eval splits share no image where the plugin
documents them as separate sources.

CONTRACT builds each dataset's small on-disk fixture; a newly registered dataset without an entry
fails ``test_contract_table_covers_the_registry``.
"""
from __future__ import annotations

import gzip
import io
import itertools
import struct
import tarfile
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image

from core.plugins import get_registry

REG = get_registry()
SIZE = 16


def _fashion_mnist(tmp) -> dict:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 4)):
        arr = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        (tmp / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(bytes([0, 0, 8, 3]) + struct.pack(">3i", *arr.shape) + arr.tobytes()))
        lab = (np.arange(n) % 10).astype(np.uint8)
        (tmp / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes([0, 0, 8, 1]) + struct.pack(">i", n) + lab.tobytes()))
    return {"root": str(tmp)}


def _image_folder(tmp) -> dict:
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for cls in ("n01_cat", "n02_dog"):
            d = tmp / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return {"root": str(tmp)}


def _webdataset(tmp) -> dict:
    rng = np.random.default_rng(2)
    paths = []
    for s in range(3):
        path = tmp / f"shard-{s}.tar"
        with tarfile.open(path, "w") as tar:
            for j in range(4):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(buf, format="PNG")
                for ext, data in (("png", buf.getvalue()), ("txt", f"caption {s} {j}".encode()), ("cls", str(j % 2).encode())):
                    info = tarfile.TarInfo(f"{s:02d}{j:02d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    # separate eval shard given explicitly: the default (the last train shard) is NOT disjoint
    return {"shards": paths[:2], "eval_shards": paths[2:], "class_names": ["even", "odd"], "shuffle_buffer": 4}


# dataset type -> (tmp dir -> config without type/image_size, train/eval documented as disjoint)
CONTRACT: dict[str, tuple[Callable[[Any], dict], bool]] = {
    "shapes": (lambda t: {"train_size": 24}, False),  # both splits drawn from the same generator: not promised disjoint
    "fashion_mnist": (_fashion_mnist, True),  # train-* vs t10k-* files
    "image_folder": (_image_folder, True),  # train_dir vs eval_dir
    "webdataset": (_webdataset, True),  # shards vs eval_shards
}


def test_contract_table_covers_the_registry():
    assert set(CONTRACT) == set(REG.names("datasets")), "add the new dataset to CONTRACT"


def make(name: str, cfg: dict, split: str, seed: int = 0):
    cls = REG.get("datasets", name)
    return cls(cls.Config(type=name, image_size=SIZE, **cfg), split, seed)


def items(ds, n: int = 8) -> list[dict[str, Any]]:
    if isinstance(ds, torch.utils.data.IterableDataset):
        return list(itertools.islice(iter(ds), n))
    return [ds[i] for i in range(min(n, len(ds)))]


def fixture_config(tmp_path, name) -> dict:
    """The dataset's files written once under tmp_path; its config (without type / image_size)."""
    d = tmp_path / name
    d.mkdir()
    return CONTRACT[name][0](d)


@pytest.mark.parametrize("name", REG.names("datasets"))
@pytest.mark.parametrize("split", ["train", "eval"])
def test_items_have_the_documented_keys_dtypes_ranges_and_shapes(name, split, tmp_path):
    if name not in CONTRACT:
        pytest.fail(f"dataset {name!r} has no CONTRACT entry")
    ds = make(name, fixture_config(tmp_path, name), split)
    assert ds.split == split and ds.seed == 0 and ds.cfg.type == name
    got = items(ds)
    assert got
    for it in got:
        img = it["image"]
        assert torch.is_tensor(img) and img.dtype == torch.float32 and img.shape == (3, SIZE, SIZE)
        assert img.min() >= -1 and img.max() <= 1 and torch.isfinite(img).all()
        if ds.cfg.provides_text:
            assert isinstance(it["text"], str) and it["text"]
        if ds.class_names:
            assert isinstance(it["label"], int) and 0 <= it["label"] < len(ds.class_names)
        for attr, values in ds.attributes.items():
            assert isinstance(it[f"label_{attr}"], int) and 0 <= it[f"label_{attr}"] < len(values)
    torch.utils.data.default_collate(got)  # batches with the default collate


@pytest.mark.parametrize("name", REG.names("datasets"))
@pytest.mark.parametrize("split", ["train", "eval"])
def test_deterministic_per_seed(name, split, tmp_path):
    """Same (config, split, seed) -> same items. Train-split augmentations (random crop / flip of
    image_folder and webdataset) draw from torch's global generator, which the trainer seeds
    from the experiment seed (and DataLoader workers from it), so it is seeded here too."""
    root = fixture_config(tmp_path, name)
    torch.manual_seed(0)
    a = items(make(name, root, split, seed=5))
    torch.manual_seed(0)
    b = items(make(name, root, split, seed=5))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x["image"], y["image"]) and x.get("text") == y.get("text") and x.get("label") == y.get("label")


@pytest.mark.parametrize("name", [n for n in REG.names("datasets") if CONTRACT.get(n, (None, False))[1]])
def test_train_and_eval_splits_are_disjoint(name, tmp_path):
    root = fixture_config(tmp_path, name)
    train = {it["image"].numpy().tobytes() for it in items(make(name, root, "train"), 100)}
    evals = [it["image"].numpy().tobytes() for it in items(make(name, root, "eval"), 100)]
    assert train and evals and not train & set(evals)
