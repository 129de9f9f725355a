"""Reconstruction and sample grids of a grid experiment: pictures that are part of its results record.

When ``core.reproduce`` collects a grid study, each cell is represented by one run: seed 0, or the
lowest seed that finished, at its final (newest valid) checkpoint. Two PNGs are made from them and
stored next to the record, ``results/<experiment>.recon.png`` and ``results/<experiment>.samples.png``:

- reconstructions: row 1 the first :data:`N_IMAGES` images of the eval split (the data config of
  the cells at seed 0: the same images for every cell), then one row per cell, that run's model
  (``core.rundir.load_for_inference``, eval mode, float32) reconstructing exactly those images.
  Rows are comparable: same inputs, same tile size, each under a label naming cell, seed and step.
- samples (only when the cells' ``eval`` holds a ``generation`` evaluator): per cell, the
  per-class sample grid that evaluator saved at the final evaluation
  (``<run>/generation/samples_<step>.png``, one row per class), cut back into its native-size
  images (the saved grid is upscaled without smoothing) and stacked under the cell's label, at most
  :data:`SAMPLES_PER_CLASS` samples per class.

Images are tiles of at least :data:`MIN_TILE` px (integer nearest-neighbour upscaling) on a white
canvas with :data:`PAD` px gaps and a :data:`LABEL_H` px label line above each row (samples: above
each cell's block). The PNG holds no metadata (no time stamps): the same runs give the same bytes.

The record's ``grids`` lists them: ``{"recon": {"file", "images", "tile", "rows": [{"cell", "seed",
"step"}], "missing": {cell: why}}, "samples": {... "classes": [...], "per_class"}}``; a cell
whose run directory is gone (a record collected on another machine) is ``missing``, and with no
cell left there is no grid at all: the record has no entry and the page shows none.
"""
from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

N_IMAGES = 8  # eval images per row
SAMPLES_PER_CLASS = 4  # samples per class shown (the saved grid may hold more)
MIN_TILE = 32  # smallest tile side in px
PAD = 2  # px between tiles and around the canvas
LABEL_H = 12  # px of the label line above a row (samples: above a cell's block)
DATA_SEED = 0  # the eval split every reconstruction row shows
KINDS = ("recon", "samples")
IMAGES = "_grid_images"  # the key under which collect() hands the PIL images to write_results


# ------------------------------------------------------------------------------------------------
# which run stands for each cell
# ------------------------------------------------------------------------------------------------


def pick_runs(trials: list[Any], order: list[str]) -> dict[str, tuple[int, str | None, str | None]]:
    """cell -> (seed, run directory, MLflow run id) of its lowest finished seed, cells in ``order``."""
    best: dict[str, tuple[int, str | None, str | None]] = {}
    for t in trials:
        if t.state != "COMPLETE":
            continue
        rec = t.record
        for seed in rec.metrics:
            s = int(seed)
            if rec.cell not in best or s < best[rec.cell][0]:
                best[rec.cell] = (s, rec.run_dirs.get(s), rec.run_ids.get(s))
    return {c: best[c] for c in order if c in best}


def locate(run_dir: str | None, run_id: str | None) -> tuple[Path, Path] | None:
    """(run directory, newest valid checkpoint), found by the recorded directory or else the MLflow
    run id (``core.rundir.resolve_checkpoint``); None when neither leads to a checkpoint."""
    from core import rundir

    for key in (run_dir, run_id):
        if not key or (key == run_dir and not Path(key).is_dir()):
            continue
        try:
            return rundir.resolve_checkpoint(key)
        except Exception:  # noqa: BLE001 - ConfigError, or an MLflow store that cannot be reached
            continue
    return None


# ------------------------------------------------------------------------------------------------
# pixels
# ------------------------------------------------------------------------------------------------


def to_uint8(x: Any) -> np.ndarray:
    """(n, 3, H, W) images in [-1, 1] -> (n, H, W, 3) uint8: round((x + 1) * 127.5), clamped."""
    import torch

    x = torch.as_tensor(x).detach().float().cpu().clamp(-1, 1)
    return ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def scale_of(side: int) -> int:
    """The integer upscaling factor that makes a ``side`` px image at least :data:`MIN_TILE` px."""
    return max(1, math.ceil(MIN_TILE / max(1, side)))


def upscale(tile: np.ndarray, k: int) -> np.ndarray:
    return tile if k == 1 else tile.repeat(k, axis=0).repeat(k, axis=1)


def _font() -> Any:
    from PIL import ImageFont

    return ImageFont.load_default()


def _label(draw: Any, xy: tuple[int, int], text: str, width: int, font: Any) -> None:
    """``text`` at ``xy``, cut (with an ellipsis) to fit ``width`` px."""
    if draw.textlength(text, font=font) > width:
        while text and draw.textlength(text + "…", font=font) > width:
            text = text[:-1]
        text += "…"
    draw.text(xy, text, fill=(0, 0, 0), font=font)


def compose(blocks: list[tuple[str, list[list[np.ndarray]]]], cols: int, tile: int) -> Any:
    """A PIL image: for each (label, rows of uint8 tiles) a label line, then its rows of ``tile`` px
    tiles (``cols`` per row, ``PAD`` px apart). Row r of all rows so far starts at
    y = PAD + (blocks so far) * LABEL_H + r * (tile + PAD)."""
    from PIL import Image, ImageDraw

    n_rows = sum(len(rows) for _, rows in blocks)
    w = PAD + cols * (tile + PAD)
    h = PAD + len(blocks) * LABEL_H + n_rows * (tile + PAD)
    canvas = np.full((h, w, 3), 255, dtype=np.uint8)
    y, label_at = PAD, []
    for label, rows in blocks:
        label_at.append((label, y))
        y += LABEL_H
        for row in rows:
            for c, t in enumerate(row[:cols]):
                x = PAD + c * (tile + PAD)
                canvas[y:y + t.shape[0], x:x + t.shape[1]] = t
            y += tile + PAD
    img = Image.fromarray(canvas, "RGB")
    draw, font = ImageDraw.Draw(img), _font()
    for label, ly in label_at:
        _label(draw, (PAD, ly - 1), label, w - 2 * PAD, font)
    return img


def png_bytes(img: Any) -> bytes:
    """PNG bytes with no metadata chunks (PIL writes no time or software text unless asked)."""
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------
# the two grids
# ------------------------------------------------------------------------------------------------


def eval_images(exp: Any, n: int = N_IMAGES) -> tuple[Any, Any]:
    """(the first ``n`` images of the eval split of ``exp.data`` at seed :data:`DATA_SEED`, built as
    the trainer builds it; the dataset)."""
    import torch

    from core.plugins import get_registry
    from core.seeding import seeded
    from core.trainer import eval_loader

    with seeded(DATA_SEED, "data.eval"):
        ds = get_registry().get("datasets", exp.data.type)(exp.data, split="eval", seed=DATA_SEED)
    got = []
    for batch in eval_loader(ds, exp.train):
        got.append(batch["image"])
        if sum(len(b) for b in got) >= n:
            break
    return torch.cat(got)[:n], ds


def reconstruct(model: Any, x: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(x.to(next(model.parameters()).device).float())["recon"].float().cpu()


def sample_tiles(png: Path, side: int, per_class: int) -> list[list[np.ndarray]] | None:
    """The native-size images of a saved sample grid (``nrow=per_class``, 2 px padding, each image
    upscaled k times), one list per row (class); None when the file does not have that layout."""
    from PIL import Image

    with Image.open(png) as im:
        arr = np.asarray(im.convert("RGB"))
    h, w = arr.shape[:2]
    cell_w = (w - 2) / max(1, per_class)
    k = (cell_w - 2) / side
    if per_class < 1 or k != int(k) or k < 1 or (h - 2) % (side * int(k) + 2):
        return None
    k, step = int(k), side * int(k) + 2
    return [[arr[2 + r * step:2 + r * step + side * k:k, 2 + c * step:2 + c * step + side * k:k]
             for c in range(per_class)] for r in range((h - 2) // step)]


def _generation(exp: Any) -> Any | None:
    return next((e for e in exp.eval if getattr(e, "type", None) == "generation"), None)


def make(trials: list[Any], order: list[str], name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the record's ``grids`` entry, {kind: PIL image}) for the cells in ``order``."""
    from core import rundir

    runs = pick_runs(trials, order)
    missing: dict[str, str] = {c: "no finished run" for c in order if c not in runs}
    recon_missing: dict[str, str] = {}
    loaded = []  # (cell, seed, run_dir, step, exp): one model in memory at a time
    ref = x = ds = None
    rows_meta: list[dict[str, Any]] = []
    blocks: list[tuple[str, list[list[np.ndarray]]]] = []
    k = 1
    for cell, (seed, run_dir, run_id) in runs.items():
        found = locate(run_dir, run_id)
        if found is None:
            missing[cell] = "run directory not found"
            continue
        rd, ckpt = found
        try:
            exp, model = rundir.load_for_inference(str(ckpt))
        except Exception as err:  # noqa: BLE001 - a damaged run leaves its row out, not the record
            missing[cell] = f"checkpoint not loadable ({type(err).__name__})"
            continue
        step = rundir.step_of(ckpt)
        loaded.append((cell, seed, rd, step, exp))
        if ref is None:  # the first cell's data gives the images every row shows
            ref = exp
            x, ds = eval_images(ref)
            k = scale_of(int(x.shape[-1]))
            blocks.append(("eval images (originals)", [[upscale(t, k) for t in to_uint8(x)]]))
        if exp.data.model_dump() != ref.data.model_dump():
            recon_missing[cell] = "different data"
        else:
            blocks.append((f"{cell} (seed {seed}, step {step})", [[upscale(t, k) for t in to_uint8(reconstruct(model, x))]]))
            rows_meta.append({"cell": cell, "seed": seed, "step": step})
        del model
    if not loaded:
        return {}, {}
    recon_missing = {**missing, **recon_missing}
    tile = int(x.shape[-1]) * k
    images: dict[str, Any] = {"recon": compose(blocks, len(x), tile)}
    meta: dict[str, Any] = {}
    meta["recon"] = {"file": f"{name}.recon.png", "images": len(x), "tile": tile, "data_seed": DATA_SEED,
                     "rows": rows_meta, "missing": {c: recon_missing[c] for c in order if c in recon_missing}}

    if any(_generation(exp) is not None for *_, exp in loaded):
        rows_meta, blocks, classes, per = [], [], None, 0
        samples_missing = dict(missing)
        for cell, seed, rd, step, exp in loaded:
            gen = _generation(exp)
            png = Path(rd) / "generation" / f"samples_{step:08d}.png"
            if gen is None or not getattr(gen, "grid_per_class", 0) or not png.is_file():
                samples_missing[cell] = "no sample grid at the final step"
                continue
            tiles = sample_tiles(png, exp.data.image_size, gen.grid_per_class)
            if tiles is None:
                samples_missing[cell] = "sample grid of an unexpected layout"
                continue
            kc = scale_of(exp.data.image_size)
            blocks.append((f"{cell} (seed {seed}, step {step})",
                           [[upscale(t, kc) for t in row[:SAMPLES_PER_CLASS]] for row in tiles]))
            rows_meta.append({"cell": cell, "seed": seed, "step": step, "classes": len(tiles)})
            per = max(per, min(SAMPLES_PER_CLASS, gen.grid_per_class))
            classes = classes or len(tiles)
        if blocks:
            names = list(getattr(ds, "class_names", None) or [])
            images["samples"] = compose(blocks, per, max(scale_of(e.data.image_size) * e.data.image_size
                                                         for *_, e in loaded))
            meta["samples"] = {"file": f"{name}.samples.png", "per_class": per, "rows": rows_meta,
                               "classes": names if len(names) == classes else [],
                               "missing": {c: samples_missing[c] for c in order if c in samples_missing}}
    return meta, images


def attach(data: dict[str, Any], trials: list[Any], sampler: str) -> dict[str, Any]:
    """``data`` (a results record being collected) with its ``grids`` and the images to write; a
    failure here costs the pictures, never the record."""
    if sampler != "grid":
        return data
    try:
        meta, images = make(trials, data["cell_order"], data["experiment"])
    except Exception as err:  # noqa: BLE001 - the numbers are the data; pictures are a nicety
        from core.errors import one_line

        print(f"vtok reproduce: no grids for {data['experiment']} ({type(err).__name__}: {one_line(err)})", file=sys.stderr)
        meta, images = {}, {}
    return {**data, "grids": meta, IMAGES: images}


# ------------------------------------------------------------------------------------------------
# files: next to the record, copied next to the page
# ------------------------------------------------------------------------------------------------


def split(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the record without its images, {kind: image})."""
    return {k: v for k, v in data.items() if k != IMAGES}, data.get(IMAGES) or {}


def write_images(data: dict[str, Any], images: dict[str, Any], results_dir: Path) -> None:
    """Write the record's grid PNGs (atomically) and remove the experiment's grid files it no longer lists."""
    grids = data.get("grids") or {}
    for kind in KINDS:
        path = results_dir / f"{data['experiment']}.{kind}.png"
        if kind in grids and kind in images:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(png_bytes(images[kind]))
            tmp.replace(path)
        elif kind not in grids:
            path.unlink(missing_ok=True)


def present(data: dict[str, Any], results_dir: Path) -> dict[str, Any]:
    """The loaded record without grid entries whose file is not in ``results_dir`` (the page shows
    only pictures it can copy)."""
    grids = data.get("grids") or {}
    gone = [k for k, g in grids.items() if not (results_dir / str(g.get("file", ""))).is_file()]
    for k in gone:
        print(f"vtok reproduce: {data['experiment']}: {grids[k].get('file')} is listed but not in {results_dir}; "
              "not shown", file=sys.stderr)
    return {**data, "grids": {k: g for k, g in grids.items() if k not in gone}} if gone else data


def copy_images(data: dict[str, dict[str, Any]], results_dir: Path, out_dir: Path) -> None:
    for d in data.values():
        for g in (d.get("grids") or {}).values():
            out_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(results_dir / g["file"], out_dir / g["file"])


def _rows_text(g: dict[str, Any]) -> str:
    seeds = {r["seed"] for r in g["rows"]}
    return "seed " + ", ".join(map(str, sorted(seeds))) if len(seeds) == 1 else "the lowest finished seed of each cell"


def _missing_text(g: dict[str, Any]) -> str:
    miss = g.get("missing") or {}
    return f" No row for {'; '.join(f'{c} ({why})' for c, why in miss.items())}." if miss else ""


def page_lines(d: dict[str, Any], link_base: str = "results") -> list[str]:
    """The section's lines for the record's grids (none without grids)."""
    grids = d.get("grids") or {}
    out: list[str] = []
    g = grids.get("recon")
    if g:
        out += ["", f"Reconstructions by each cell's final checkpoint ({_rows_text(g)}) of the first {g['images']} eval "
                f"images (row 1: originals; one row per cell).{_missing_text(g)}", "",
                f"![reconstructions (row 1: originals; one row per cell)]({link_base}/{g['file']})"]
    g = grids.get("samples")
    if g:
        classes = f" ({', '.join(g['classes'])})" if g.get("classes") else ""
        out += ["", f"Samples of each cell's class-conditional prior at the final evaluation ({_rows_text(g)}): one "
                f"block per cell, one row per class{classes}, {g['per_class']} per class.{_missing_text(g)}", "",
                f"![samples, one row per class, one block per cell]({link_base}/{g['file']})"]
    return out
