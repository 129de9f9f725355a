"""``python -m core.tokenize``: encode a dataset to token indices, or decode indices back to images.

Encode (indices for training a generator downstream)::

    python -m core.tokenize --run RUN --out tokens.safetensors [--data DATA.yaml] [key=value ...]
                            [--split train|eval] [--limit N|all] [--batch-size B] [--device cpu]

By default the eval split's first ``train.eval_size`` images (the ones the run was evaluated on)
are encoded; ``--limit N`` or ``--limit all`` says otherwise. A progress bar shows on stderr.

Decode::

    python -m core.tokenize --run RUN --decode tokens.safetensors --out images.safetensors  # or a directory of PNGs

``RUN`` is a run directory (``runs/<name>-<hash>/``), a checkpoint directory inside it, or an MLflow
run id (:func:`core.rundir.load_for_inference`).

The dataset: by default the run's own ``data`` section. ``--data FILE.yaml`` gives another one: a
YAML file holding either a dataset config mapping (``{type: image_folder, root: ..., image_size:
256}``) or a whole experiment (its ``data:`` section is used). Trailing ``key=value`` arguments
override fields of that dataset config (values parsed as YAML), e.g. ``type=shapes train_size=512``;
changing ``type`` starts from that dataset's defaults. The image size must be the model's.

The tokens file (safetensors): ``indices`` int64 ``(N_images, N_tokens, K)`` (row-major token
grid, K codes per token in the quantizer's documented order) and ``labels`` int64 ``(N_images,)``
when the data has labels; metadata (strings): ``grid`` ``"h,w"``, ``codes_per_token``,
``codebook_sizes`` (JSON list), ``image_size``, ``quantizer`` (its config as JSON), ``run``.
Decoding writes ``images`` float32 ``(N, 3, H, W)`` in [-1, 1] to a ``.safetensors`` file, or one
PNG per image into a directory.

Bad input -> one line on stderr naming the problem, exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import Tensor

from core.cli import report
from core.display import plain as _plain
from core.errors import ConfigError



EXAMPLES = """examples (RUN is a run directory such as runs/quickstart-<hash>, or an MLflow run id):
  python -m core.tokenize --run RUN --out tokens.safetensors
      the run's eval images (as many as its train.eval_size)
  python -m core.tokenize --run RUN --out train_tokens.safetensors --split train --limit 5000
  python -m core.tokenize --run RUN --out tokens.safetensors --limit all train_size=1000
      dataset fields as key=value (here: the shapes eval split is train_size long)
  python -m core.tokenize --run RUN --decode tokens.safetensors --out images/"""


def _limit(text: Optional[str]) -> Optional[int]:
    """``--limit``: a positive count or ``all`` (None)."""
    if text is None or text == "all":
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n <= 0:
        raise ConfigError("--limit", f"a positive number of images or 'all', got {text!r}")
    return n


def parser() -> argparse.ArgumentParser:
    from core.cli import OneLineParser

    p = OneLineParser(prog="python -m core.tokenize", description=_plain(__doc__.split("\n\n")[0]),
                      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    p.add_argument("--run", required=True, help="run directory, checkpoint directory or MLflow run id")
    p.add_argument("--out", required=True, help="tokens .safetensors (encode); images .safetensors or a directory of PNGs (decode)")
    p.add_argument("--decode", metavar="TOKENS", help="decode this tokens file instead of encoding a dataset")
    p.add_argument("--data", metavar="DATA.yaml", help="dataset config file (a dataset mapping or an experiment); default: the run's data")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the dataset config fields")
    p.add_argument("--split", default="eval", choices=["train", "eval"], help="dataset split to encode (default: eval)")
    p.add_argument("--limit", metavar="N|all", default=None,
                   help="encode at most this many images, or 'all' (default: with --split eval the run's train.eval_size, "
                        "the images it was evaluated on; with --split train all)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    p.add_argument("--seed", type=int, default=None, help="dataset seed (default: the run's seed)")
    return p


# ---- the dataset --------------------------------------------------------------------------------


def data_config(run_data: Any, data_file: Optional[str], overrides: list[str]) -> Any:
    """The dataset config to encode: the run's, or ``data_file``'s, with ``key=value`` overrides."""
    from pydantic import ValidationError

    from core.config import parse_override, read_yaml, set_dotted
    from core.plugins import get_registry

    data = run_data.model_dump(mode="json")
    if data_file is not None:
        raw = read_yaml(data_file)
        data = raw["data"] if isinstance(raw.get("data"), dict) else raw
    parsed = [parse_override(o) for o in overrides]
    if any(parts == ["type"] and value != data.get("type") for parts, value in parsed):
        data = {}  # another dataset type: start from its defaults, not from the other type's fields
    for parts, value in parsed:
        set_dotted(data, parts, value)
    reg = get_registry()
    if "type" not in data:
        raise ConfigError("data.type", f"missing; choose one of: {', '.join(reg.names('datasets'))}")
    try:
        return reg.get("datasets", data["type"]).Config.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in ("data", *err["loc"]))
        msg = "unknown key (extra inputs are not permitted)" if err["type"] == "extra_forbidden" else err["msg"][0].lower() + err["msg"][1:]
        raise ConfigError(where, msg) from None


def image_batches(dataset: Any, batch_size: int, limit: Optional[int],
                  num_workers: int = 0) -> Iterator[tuple[Tensor, Optional[Tensor]]]:
    """(images, labels or None) batches in dataset order, at most ``limit`` images."""
    from torch.utils.data import DataLoader, IterableDataset, Subset

    if not isinstance(dataset, IterableDataset):
        dataset = Subset(dataset, range(min(limit or len(dataset), len(dataset))))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_collate)
    seen = 0
    for images, labels in loader:
        if limit is not None and seen + len(images) > limit:  # a stream: cut the last batch
            keep = limit - seen
            images, labels = images[:keep], (labels[:keep] if labels is not None else None)
        if len(images):
            yield images, labels
        seen += len(images)
        if limit is not None and seen >= limit:
            return


def _collate(items: list[dict[str, Any]]) -> tuple[Tensor, Optional[Tensor]]:
    images = torch.stack([it["image"] for it in items])
    has_labels = all("label" in it for it in items)
    return images, (torch.tensor([int(it["label"]) for it in items], dtype=torch.int64) if has_labels else None)


# ---- encode / decode ----------------------------------------------------------------------------


def _bar(total: Optional[int], unit: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, dynamic_ncols=True, file=sys.stderr)


def _expected(dataset: Any, limit: Optional[int]) -> Optional[int]:
    try:
        n = len(dataset)
    except TypeError:  # a stream
        return limit
    return min(n, limit) if limit is not None else n


@torch.no_grad()
def encode_dataset(model: Any, dataset: Any, batch_size: int = 64, limit: Optional[int] = None,
                   device: str = "cpu", num_workers: int = 0, progress: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """All images -> int64 indices ``(N, N_tokens, K)`` (and labels when every item has one)."""
    model.eval()
    chunks, label_chunks = [], []
    bar = _bar(_expected(dataset, limit), "img", progress)
    for images, labels in image_batches(dataset, batch_size, limit, num_workers):
        chunks.append(model.encode(images.to(device)).cpu())
        label_chunks.append(labels)
        if bar is not None:
            bar.update(len(images))
    if bar is not None:
        bar.close()
    if not chunks:
        raise ConfigError("data", "the dataset split is empty")
    labels = torch.cat(label_chunks) if all(lab is not None for lab in label_chunks) else None
    return torch.cat(chunks).to(torch.int64), labels


@torch.no_grad()
def decode_indices(model: Any, indices: Tensor, batch_size: int = 64, device: str = "cpu") -> Tensor:
    """int64 ``(N, N_tokens, K)`` -> images ``(N, 3, H, W)`` in [-1, 1] (float32, on the CPU)."""
    model.eval()
    out = [model.decode(indices[i:i + batch_size].to(device)).float().clamp(-1, 1).cpu()
           for i in range(0, len(indices), batch_size)]
    return torch.cat(out)


def token_metadata(model: Any, run: str) -> dict[str, str]:
    q = model.quantizer
    return {"grid": f"{model.grid[0]},{model.grid[1]}", "codes_per_token": str(q.codes_per_token),
            "codebook_sizes": json.dumps(list(q.codebook_sizes)), "image_size": str(model.image_size),
            "quantizer": json.dumps(model.spec.quantizer.model_dump(mode="json")), "run": run}


def save_tokens(path: str | Path, indices: Tensor, metadata: dict[str, str], labels: Optional[Tensor] = None) -> None:
    from safetensors.torch import save_file

    tensors = {"indices": indices.contiguous()}
    if labels is not None:
        tensors["labels"] = labels.contiguous()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)


def load_tokens(path: str | Path) -> tuple[Tensor, dict[str, str]]:
    """(indices, metadata) of a tokens file; ConfigError when it is not one."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise ConfigError(str(path), "tokens file not found")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            if "indices" not in f.keys():
                raise ConfigError(str(path), "no 'indices' tensor (not a python -m core.tokenize output)")
            return f.get_tensor("indices"), meta
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise ConfigError(str(path), f"not a safetensors file ({type(e).__name__})") from None


def check_tokens_fit(model: Any, indices: Tensor, meta: dict[str, str], path: str) -> None:
    """The tokens must come from a model with this grid and code layout."""
    grid = f"{model.grid[0]},{model.grid[1]}"
    if meta.get("grid", grid) != grid:
        raise ConfigError(path, f"token grid {meta['grid']} does not match the model's {grid}")
    k = model.quantizer.codes_per_token
    if indices.dim() != 3 or indices.shape[1] != model.grid[0] * model.grid[1] or indices.shape[2] != k:
        raise ConfigError(path, f"indices of shape {tuple(indices.shape)}; the model needs (N, {model.grid[0] * model.grid[1]}, {k})")
    if indices.dtype.is_floating_point or indices.dtype == torch.bool or indices.dtype.is_complex:
        raise ConfigError(path, f"indices are {indices.dtype}; token indices are integers (int64)")
    sizes = torch.tensor(model.quantizer.codebook_sizes)
    if indices.numel() and ((indices < 0).any() or (indices >= sizes).any()):
        raise ConfigError(path, f"indices outside the codebooks (sizes {list(model.quantizer.codebook_sizes)})")


def save_images(out: str, images: Tensor, progress: bool = False) -> None:
    """``.safetensors`` -> tensor ``images``; otherwise a directory of ``00000.png`` ..."""
    if out.endswith(".safetensors"):
        from safetensors.torch import save_file

        Path(out).parent.mkdir(parents=True, exist_ok=True)
        save_file({"images": images.contiguous()}, out)
        return
    from torchvision.utils import save_image

    Path(out).mkdir(parents=True, exist_ok=True)
    bar = _bar(len(images), "png", progress)
    for i, img in enumerate(images):
        save_image((img + 1) / 2, str(Path(out) / f"{i:05d}.png"))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()


# ---- CLI ----------------------------------------------------------------------------------------


def run_encode(args: argparse.Namespace, exp: Any, model: Any) -> None:
    cfg = data_config(exp.data, args.data, args.overrides)
    if cfg.image_size != model.image_size:
        raise ConfigError("data.image_size", f"{cfg.image_size} differs from the model's image size {model.image_size}")
    from core.plugins import get_registry

    seed = exp.seed if args.seed is None else args.seed
    dataset = get_registry().get("datasets", cfg.type)(cfg, split=args.split, seed=seed)
    limit = args.limit
    if limit is None and args.split == "eval" and not args.limit_given:
        limit = exp.train.eval_size  # the eval images the run was evaluated on, not the whole split
    n = _expected(dataset, limit)
    print(f"encoding {n if n is not None else 'every'} {args.split} image(s)"
          + (f" (--limit {limit}; --limit all for the whole split)" if limit is not None and not args.limit_given else ""),
          file=sys.stderr)
    indices, labels = encode_dataset(model, dataset, args.batch_size, limit, args.device, args.num_workers, progress=True)
    save_tokens(args.out, indices, token_metadata(model, args.run), labels)
    print(f"{args.out}: {indices.shape[0]} images -> indices {tuple(indices.shape)}, grid {model.grid[0]}x{model.grid[1]}")


def run_decode(args: argparse.Namespace, model: Any) -> None:
    if args.data or args.overrides:
        raise ConfigError("--data", "dataset options apply to encoding, not to --decode")
    indices, meta = load_tokens(args.decode)
    check_tokens_fit(model, indices, meta, args.decode)
    images = decode_indices(model, indices, args.batch_size, args.device)
    save_images(args.out, images, progress=True)
    print(f"{args.out}: {images.shape[0]} images of {images.shape[-2]}x{images.shape[-1]}")


def check_out(out: str, decode: bool) -> None:
    """The output can be written: a ``.safetensors`` file that is not a directory, or a directory of
    PNGs that is not a file; neither under a file. Checked before any encoding or decoding."""
    from core.boundary import check_directory

    p = Path(out).expanduser()
    if out.endswith(".safetensors") or not decode:
        if p.is_dir():
            raise ConfigError("--out", f"{out} is a directory; give a .safetensors file path")
        check_directory(p.parent, "--out")
    else:
        check_directory(p, "--out")


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:  # a bad command line: one line printed already
        return int(e.code or 0)
    args.limit_given = args.limit is not None
    try:
        args.limit = _limit(args.limit)
        if args.batch_size <= 0:
            raise ConfigError("--batch-size", f"must be positive, got {args.batch_size}")
        if args.num_workers < 0:
            raise ConfigError("--num-workers", f"must be >= 0, got {args.num_workers}")
        from core.boundary import check_device

        check_device(args.device, "--device")
        check_out(args.out, bool(args.decode))
        if args.decode:
            load_tokens(args.decode)  # a missing or unreadable tokens file before the model is loaded
        from core.rundir import load_for_inference

        exp, model = load_for_inference(args.run, device=args.device)
        if args.decode:
            run_decode(args, model)
        else:
            run_encode(args, exp, model)
        return 0
    except ConfigError as e:
        return report(e)


if __name__ == "__main__":
    sys.exit(main())
