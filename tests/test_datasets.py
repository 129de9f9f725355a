"""Datasets: shapes (determinism, attributes, holdout), Fashion-MNIST (IDX reading), ImageFolder,
WebDataset (every sample exactly once per epoch across workers and ranks)."""
from __future__ import annotations

import gzip
import io
import struct
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from core.errors import ConfigError
from plugins.datasets.fashion_mnist import FashionMnist, FashionMnistConfig, read_idx
from plugins.datasets.image_folder import ImageFolder, ImageFolderConfig
from plugins.datasets.shapes import ATTRIBUTES, COLOURS, SHAPES, Shapes, ShapesConfig
from plugins.datasets.webdataset import WebDataset, WebDatasetConfig, expand_shards


# ---- shapes ---------------------------------------------------------------------------------

def test_shapes_deterministic_and_in_range():
    cfg = ShapesConfig(image_size=32, train_size=50)
    a, b = Shapes(cfg, "train", seed=3), Shapes(cfg, "train", seed=3)
    for i in (0, 7, 49):
        assert torch.equal(a[i]["image"], b[i]["image"]) and a[i]["text"] == b[i]["text"]
    assert not torch.equal(a[0]["image"], Shapes(cfg, "eval", seed=3)[0]["image"])
    assert not torch.equal(a[0]["image"], Shapes(cfg, "train", seed=4)[0]["image"])
    x = a[0]["image"]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    with pytest.raises(IndexError):
        a[50]


def test_shapes_labels_match_caption_and_pixels():
    ds = Shapes(ShapesConfig(image_size=64, train_size=40), "train", seed=0)
    for i in range(40):
        item = ds[i]
        attrs = {k: ATTRIBUTES[k][item[f"label_{k}"]] for k in ATTRIBUTES}
        assert item["label"] == SHAPES.index(attrs["shape"])
        assert attrs["shape"] in item["text"].lower() and attrs["colour"] in item["text"].lower()
        # the shape's exact colour is present (the interior of a 64 px shape is never anti-aliased)
        rgb = torch.tensor(COLOURS[attrs["colour"]], dtype=torch.float32) / 127.5 - 1
        hit = (item["image"] - rgb[:, None, None]).abs().amax(0) < 1e-5
        assert hit.sum() >= 10, (i, attrs)


def test_shapes_every_attribute_value_occurs():
    ds = Shapes(ShapesConfig(image_size=16, train_size=400), "train", seed=0)
    items = [ds[i] for i in range(400)]
    for k, values in ATTRIBUTES.items():
        assert set(it[f"label_{k}"] for it in items) == set(range(len(values))), k


def test_shapes_holdout():
    combo = {"shape": "circle", "colour": "red"}
    cfg = ShapesConfig(image_size=16, train_size=300, holdout=[combo])
    red, circle = list(COLOURS).index("red"), SHAPES.index("circle")
    is_held = lambda it: it["label_shape"] == circle and it["label_colour"] == red  # noqa: E731
    train = [Shapes(cfg, "train")[i] for i in range(300)]
    assert not any(is_held(it) for it in train)
    only = Shapes(cfg.model_copy(update={"eval_holdout": "only"}), "eval", size=20)
    assert all(is_held(only[i]) for i in range(20))
    with pytest.raises(ValueError, match="unknown colour 'mauve'"):
        ShapesConfig(holdout=[{"colour": "mauve"}])


# ---- Fashion-MNIST --------------------------------------------------------------------------

def _write_idx(path, arr: np.ndarray, code: int = 0x08, gz: bool = True):
    data = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}i", *arr.shape) + arr.tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


@pytest.fixture
def fmnist_dir(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 4)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", np.arange(n, dtype=np.uint8), gz=False)
    return tmp_path


def test_fashion_mnist_reads_idx_exactly(fmnist_dir):
    raw = read_idx(fmnist_dir / "t10k-images-idx3-ubyte.gz")
    ds = FashionMnist(FashionMnistConfig(root=str(fmnist_dir), image_size=28), "eval")
    assert len(ds) == 4 and [ds[i]["label"] for i in range(4)] == [0, 1, 2, 3]
    item = ds[2]
    expect = torch.from_numpy(raw[2].astype(np.float32)) / 127.5 - 1
    assert torch.allclose(item["image"], expect.expand(3, 28, 28), atol=1e-6)
    assert "pullover" in item["text"]
    big = FashionMnist(FashionMnistConfig(root=str(fmnist_dir), image_size=56), "train")[0]["image"]
    assert big.shape == (3, 56, 56) and torch.equal(big[0], big[2])


def test_fashion_mnist_reads_each_file_version_once(fmnist_dir):
    path = fmnist_dir / "t10k-images-idx3-ubyte.gz"
    first = read_idx(path)
    assert read_idx(path) is first  # the second split of a run shares the decompressed array
    arr = np.full((4, 28, 28), 7, dtype=np.uint8)
    _write_idx(path, arr)
    __import__("os").utime(path, ns=(1, 1))  # a rewritten file (size alone is equal) is read again
    again = read_idx(path)
    assert again is not first and np.array_equal(again, arr)


def test_fashion_mnist_missing_dir_says_how_to_get_it(tmp_path):
    with pytest.raises(ConfigError, match="dataset-fashion-mnist") as e:
        FashionMnist(FashionMnistConfig(root=str(tmp_path / "nope")))
    assert "\n" not in str(e.value)


@pytest.mark.skipif(not (FashionMnistConfig().root and __import__("os").path.isdir(FashionMnistConfig().root)),
                    reason="Debian dataset-fashion-mnist not installed")
def test_fashion_mnist_installed_files():
    ds = FashionMnist(FashionMnistConfig(image_size=32), "eval")
    assert len(ds) == 10000
    assert Counter(int(v) for v in ds.labels) == {c: 1000 for c in range(10)}


# ---- image_folder ---------------------------------------------------------------------------

def test_image_folder(tmp_path):
    for cls, colour in (("n001_cat", (255, 0, 0)), ("n002_dog", (0, 0, 255))):
        d = tmp_path / "val" / cls
        d.mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40, 30), colour).save(d / f"{i}.png")
    (tmp_path / "caps.tsv").write_text("n002_dog/1.png\ta blue square of a dog\n")
    ds = ImageFolder(ImageFolderConfig(root=str(tmp_path), image_size=16, captions=str(tmp_path / "caps.tsv")), "eval")
    assert ds.class_names == ["n001 cat", "n002 dog"] and len(ds) == 4
    item = ds[3]
    assert item["label"] == 1 and item["text"] == "a blue square of a dog"
    assert item["image"].shape == (3, 16, 16)
    assert torch.allclose(item["image"], torch.tensor([-1.0, -1.0, 1.0])[:, None, None].expand(3, 16, 16), atol=1e-2)
    assert "n001 cat" in ds[0]["text"]
    with pytest.raises(ConfigError, match="data.root"):
        ImageFolder(ImageFolderConfig(root=str(tmp_path)), "train")
    with pytest.raises(ConfigError, match="1000 ImageNet class folders, found 2"):
        ImageFolder(ImageFolderConfig(root=str(tmp_path), prompts="imagenet"), "eval")


def test_image_folder_imagenet_prompts(tmp_path):
    for i in range(1000):
        (tmp_path / "val" / f"n{i:08d}").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "n00000001" / "a.png")
    ds = ImageFolder(ImageFolderConfig(root=str(tmp_path), prompts="imagenet", image_size=8), "eval")
    assert ds.class_names[:2] == ["tench", "goldfish"] and len(ds.templates) == 80
    assert ds.templates[0].format("tench") == "a bad photo of a tench."
    assert ds[0]["label"] == 1 and "goldfish" in ds[0]["text"]


# ---- webdataset -----------------------------------------------------------------------------

def _write_shards(root, n_shards: int, per_shard: int) -> list[str]:
    paths = []
    for s in range(n_shards):
        path = root / f"shard-{s:03d}.tar"
        with tarfile.open(path, "w") as tar:
            for j in range(per_shard):
                key = f"{s:03d}{j:04d}"
                buf = io.BytesIO()
                Image.new("RGB", (12, 12), (s * 20, j * 10, 0)).save(buf, format="PNG")
                for ext, data in (("png", buf.getvalue()), ("txt", f"caption {key}".encode()), ("cls", str(s).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


def test_expand_shards(tmp_path):
    assert expand_shards("d/{008..010}.tar") == ["d/008.tar", "d/009.tar", "d/010.tar"]
    paths = _write_shards(tmp_path, 2, 1)
    assert expand_shards(str(tmp_path / "*.tar")) == paths


@pytest.mark.parametrize("n_shards", [3, 1])  # more shards than workers, and fewer
def test_webdataset_each_sample_once_per_epoch_across_two_workers(tmp_path, n_shards):
    paths = _write_shards(tmp_path, n_shards, 5)
    cfg = WebDatasetConfig(shards=str(tmp_path) + "/shard-{000..%03d}.tar" % (n_shards - 1), image_size=8, shuffle_buffer=4,
                           eval_shards=paths[-1])  # explicit: every shard trains
    ds = WebDataset(cfg, "train", seed=0)
    assert ds.shards == paths
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    expect = {f"{s:03d}{j:04d}" for s in range(n_shards) for j in range(5)}
    for epoch in range(2):
        ds.set_epoch(epoch)
        keys = [k for batch in loader for k in batch["key"]]
        assert len(keys) == len(expect) and set(keys) == expect
    item = next(iter(ds))
    assert item["text"] == f"caption {item['key']}" and item["label"] == int(item["key"][:3])
    assert item["image"].shape == (3, 8, 8)


def test_webdataset_splits_across_ranks(tmp_path, monkeypatch):
    _write_shards(tmp_path, 2, 3)
    cfg = WebDatasetConfig(shards=str(tmp_path / "*.tar"), image_size=8, eval_shards=str(tmp_path / "*.tar"))
    seen = []
    for rank in range(3):  # 3 ranks x 1 worker > 2 shards: sample-level split
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "3")
        seen.append([it["key"] for it in WebDataset(cfg, "eval")])
    assert sorted(sum(seen, [])) == sorted(f"{s:03d}{j:04d}" for s in range(2) for j in range(3))
    assert all(len(s) == 2 for s in seen)


def test_webdataset_default_eval_shard_is_not_trained_on(tmp_path):
    """Without eval_shards the last shard is the eval split and the train split leaves it out (it
    used to train on it too); with one shard there is nothing to hold out: one error."""
    paths = _write_shards(tmp_path, 3, 2)
    cfg = WebDatasetConfig(shards=str(tmp_path / "*.tar"), image_size=8)
    train, ev = WebDataset(cfg, "train"), WebDataset(cfg, "eval")
    assert train.shards == paths[:2] and ev.shards == paths[2:]
    assert not {it["key"] for it in train} & {it["key"] for it in ev}
    with pytest.raises(ConfigError, match="eval_shards"):
        WebDataset(WebDatasetConfig(shards=paths[0], image_size=8), "train")


def test_webdataset_missing_shard(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        WebDataset(WebDatasetConfig(shards=str(tmp_path / "x-{0..1}.tar")))


def test_webdataset_labels_train_the_fd_reference_network(tmp_path):
    """An iterable dataset feeds the fd reference CNN (its train split streamed, labels from .cls)."""
    from plugins.evaluators.fd import Fd, FdConfig

    _write_shards(tmp_path, 2, 4)
    cfg = WebDatasetConfig(shards=str(tmp_path / "*.tar"), image_size=8, class_names=["zero", "one"])
    ds = WebDataset(cfg, "eval")
    assert ds.class_names == ["zero", "one"]

    class Identity(torch.nn.Module):
        def forward(self, x):
            return {"recon": x}

    fd_cfg = FdConfig(extractor="reference", cache_dir=str(tmp_path / "cache"), reference=dict(width=8, steps=5, batch_size=3))
    out = Fd(fd_cfg).evaluate(Identity(), torch.utils.data.DataLoader(ds, batch_size=4))
    assert set(out) == {"fd_refnet"} and abs(out["fd_refnet"]) < 1e-6


def test_shapes_cache_returns_the_rendered_items_and_survives_a_caller_writing_into_them():
    from plugins.datasets.shapes import Shapes, ShapesConfig

    cfg = ShapesConfig(image_size=16, train_size=50)
    cached, fresh = Shapes(cfg, "train", seed=3), Shapes(cfg, "train", seed=3)
    fresh._cache = None
    assert cached._cache is not None
    for i in (0, 7, 49):
        first = cached[i]
        first["image"].zero_()  # a caller writing into its batch must not reach the cache
        again, ref = cached[i], fresh[i]
        assert torch.equal(again["image"], ref["image"]) and again.keys() == ref.keys()
        assert all(again[k] == ref[k] for k in ref if k != "image")
    assert len(cached._cache) == 3
