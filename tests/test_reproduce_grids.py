"""core.reproduce_grids: reconstruction and sample grids collected with a results record, shown on the page."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from core import reproduce as rp
from core import reproduce_grids as rg
from test_reproduce import ARGS, TINY

GEN = {"type": "generation", "width": 16, "depth": 1, "heads": 2, "steps": 3, "batch_size": 8, "n_samples": 8,
       "grid_per_class": 3, "train_images": 32, "extractor": "reference", "reference": {"width": 8, "steps": 2}}
SIDE = TINY["data"]["image_size"]  # 16 px: every tile is upscaled twice to 32 px
N_CLASSES = 6  # shapes: one class per shape kind


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """The tiny two-cell experiment (seed 0) with a generation evaluator, reproduced once: its directory."""
    d = tmp_path_factory.mktemp("grids")
    cfg = json.loads(json.dumps(TINY))
    cfg["tracking"] = {"enabled": False}
    cfg["train"]["out_dir"] = str(d / "runs")
    cfg["sweep"]["storage"] = str(d / "journal.log")
    cfg["sweep"]["seeds"] = [0]
    cfg["eval"].append(GEN)
    cfg["paper"]["claims"] = []
    (d / "experiments").mkdir()
    (d / "experiments" / "tiny.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:  # module scope: the function-scoped monkeypatch is not available
        mp.chdir(d)
        mp.setenv("VTOK_CACHE", str(d / "cache"))
        assert rp.main(ARGS) == 0
        yield d


def pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        assert im.mode == "RGB"
        return np.asarray(im).copy()


def run_dirs(d: Path) -> dict[str, Path]:
    """cell -> run directory of its seed 0, from the sweep's own trial records."""
    from core.config import read_yaml, validate
    from core.sweep import results, study as st

    exp = validate(read_yaml(d / "experiments" / "tiny.yaml"))
    trials = st.read_trials(results.find_study(exp, exp.sweep))
    return {t.record.cell: Path(t.record.run_dirs[0]) for t in trials if t.state == "COMPLETE"}


def first_eval_images(n: int = 8) -> torch.Tensor:
    """Items 0..n-1 of the 16 px shapes eval split at seed 0, straight from the dataset class."""
    from plugins.datasets.shapes import Shapes

    ds = Shapes(Shapes.Config(**TINY["data"]), split="eval", seed=0)
    return torch.stack([ds[i]["image"] for i in range(n)])


def tile(canvas: np.ndarray, top: int, col: int, t: int = 32) -> np.ndarray:
    x = 2 + col * (t + 2)
    return canvas[top:top + t, x:x + t]


def as_uint8(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8, computed here with numpy."""
    return np.clip(np.rint((x.double().numpy().transpose(1, 2, 0) + 1.0) * 127.5), 0, 255).astype(np.int16)


def test_recon_grid_is_the_eval_images_then_each_cells_reconstruction(done):
    from core import rundir

    canvas = pixels(done / "results" / "tiny.recon.png")
    # 1 + 2 rows of 8 tiles of 32 px: 2 px margins and gaps, a 12 px label line above each row
    assert canvas.shape == (2 + 3 * (12 + 32 + 2), 2 + 8 * (32 + 2), 3)
    x = first_eval_images()
    row_top = [2 + r * (12 + 32 + 2) + 12 for r in range(3)]
    for i in range(8):
        got = tile(canvas, row_top[0], i).astype(np.int16)
        assert (got[::2, ::2] == got[1::2, 1::2]).all()  # nearest-neighbour 2x
        assert np.array_equal(got[::2, ::2], as_uint8(x[i]))
    rows = {}
    for r, cell in enumerate(["vq16", "vq4"], start=1):  # the file's cell order
        _, model = rundir.load_for_inference(str(run_dirs(done)[cell]))
        with torch.no_grad():
            y = model(x)["recon"]
        rows[cell] = np.stack([tile(canvas, row_top[r], i).astype(np.int16)[::2, ::2] for i in range(8)])
        want = np.stack([as_uint8(y[i]) for i in range(8)])
        assert np.abs(rows[cell] - want).max() <= 1  # float rounding at .5 at most
        assert np.abs(rows[cell] - np.stack([as_uint8(v) for v in x])).mean() > 5  # a reconstruction, not the input
    assert np.abs(rows["vq16"] - rows["vq4"]).mean() > 1  # each row is its own cell's model
    grids = json.loads((done / "results" / "tiny.json").read_text())["grids"]
    assert grids["recon"] == {"file": "tiny.recon.png", "images": 8, "tile": 32, "data_seed": 0, "missing": {},
                              "rows": [{"cell": "vq16", "seed": 0, "step": 2}, {"cell": "vq4", "seed": 0, "step": 2}]}
    assert (done / "results" / "tiny.recon.png").stat().st_size < 100_000


def test_sample_grid_stacks_each_cells_saved_per_class_grid(done):
    canvas = pixels(done / "results" / "tiny.samples.png")
    per = min(GEN["grid_per_class"], rg.SAMPLES_PER_CLASS)
    # per cell a label line and one row per class of `per` tiles
    assert canvas.shape == (2 + 2 * 12 + 2 * N_CLASSES * (32 + 2), 2 + per * (32 + 2), 3)
    for b, cell in enumerate(["vq16", "vq4"]):
        saved = pixels(run_dirs(done)[cell] / "generation" / "samples_00000002.png")
        k = 4  # the evaluator upscales 16 px samples to 64 px, 2 px padding
        assert saved.shape[:2] == (2 + N_CLASSES * (SIDE * k + 2), 2 + GEN["grid_per_class"] * (SIDE * k + 2))
        for r in range(N_CLASSES):
            top = 2 + (b + 1) * 12 + (b * N_CLASSES + r) * (32 + 2)
            for c in range(per):
                y0, x0 = 2 + r * (SIDE * k + 2), 2 + c * (SIDE * k + 2)
                want = saved[y0:y0 + SIDE * k:k, x0:x0 + SIDE * k:k]
                got = tile(canvas, top, c)
                assert np.array_equal(got[::2, ::2], want) and np.array_equal(got[1::2, 1::2], want)
    grids = json.loads((done / "results" / "tiny.json").read_text())["grids"]
    assert grids["samples"]["per_class"] == per and grids["samples"]["classes"][:2] == ["circle", "square"]
    assert [r["cell"] for r in grids["samples"]["rows"]] == ["vq16", "vq4"]


def test_page_embeds_the_grids_and_a_second_build_gives_the_same_bytes(done, monkeypatch):
    monkeypatch.chdir(done)
    page = (done / "docs" / "RESULTS.md").read_text()
    assert page == rp.page_text("experiments", "results")
    assert "![reconstructions (row 1: originals; one row per cell)](results/tiny.recon.png)" in page
    assert "![samples, one row per class, one block per cell](results/tiny.samples.png)" in page
    assert "one row per class (circle, square, triangle, diamond, cross, ring)" in page
    before = {p.name: p.read_bytes() for p in (done / "results").glob("*.png")}
    assert set(before) == {"tiny.recon.png", "tiny.samples.png"}
    for name, b in before.items():
        assert (done / "docs" / "results" / name).read_bytes() == b
    assert b"tIME" not in before["tiny.recon.png"] and b"tEXt" not in before["tiny.recon.png"]
    # collect again (nothing trains) and rebuild the page: the same bytes
    for p in (done / "docs" / "results").glob("*.png"):
        p.unlink()
    assert rp.main(ARGS) == 0
    assert {p.name: p.read_bytes() for p in (done / "results").glob("*.png")} == before
    assert rp.main(["--report-only", *ARGS]) == 0
    assert (done / "docs" / "RESULTS.md").read_text() == page
    assert {p.name: p.read_bytes() for p in (done / "docs" / "results").glob("*.png")} == before


def collect_into(d: Path, out: Path) -> dict:
    e = rp.discover(d / "experiments")["tiny"]
    data = rp.collect(e, [])
    rp.write_results(data, out / "results")
    rp.write_page(rp.discover(d / "experiments"), out / "results", out / "docs" / "RESULTS.md", plots=False)
    return json.loads((out / "results" / "tiny.json").read_text())


def test_a_missing_run_directory_leaves_its_row_out_and_none_leaves_no_grid(done, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(done)
    dirs = run_dirs(done)
    shutil.copytree(done / "results", tmp_path / "results")  # grids from before: to be replaced
    gone = dirs["vq4"].with_name(dirs["vq4"].name + ".gone")
    dirs["vq4"].rename(gone)
    try:
        rec = collect_into(done, tmp_path)
        assert [r["cell"] for r in rec["grids"]["recon"]["rows"]] == ["vq16"]
        assert rec["grids"]["recon"]["missing"] == {"vq4": "run directory not found"}
        assert pixels(tmp_path / "results" / "tiny.recon.png").shape[0] == 2 + 2 * (12 + 32 + 2)
        assert "No row for vq4 (run directory not found)." in (tmp_path / "docs" / "RESULTS.md").read_text()
        moved = dirs["vq16"].with_name(dirs["vq16"].name + ".gone")
        dirs["vq16"].rename(moved)
        try:
            rec = collect_into(done, tmp_path)
        finally:
            moved.rename(dirs["vq16"])
    finally:
        gone.rename(dirs["vq4"])
    assert rec["grids"] == {} and rec["cells"]["vq4"]["0"]["psnr"] is not None  # the numbers are still there
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["tiny.json"]  # stale pictures removed
    page = (tmp_path / "docs" / "RESULTS.md").read_text()
    assert "## tiny" in page and "reconstructions" not in page and "samples" not in page


def test_a_listed_picture_that_is_not_there_is_not_shown(done, tmp_path, capsys):
    (tmp_path / "results").mkdir()
    shutil.copy(done / "results" / "tiny.json", tmp_path / "results")
    shutil.copy(done / "results" / "tiny.samples.png", tmp_path / "results")
    page = rp.page_text(done / "experiments", tmp_path / "results")
    assert "tiny.recon.png" not in page and "![samples, one row per class" in page
    assert "tiny.recon.png is listed but not in" in capsys.readouterr().err
    rp.write_page(rp.discover(done / "experiments"), tmp_path / "results", tmp_path / "docs" / "RESULTS.md", plots=False)
    assert sorted(p.name for p in (tmp_path / "docs" / "results").iterdir()) == ["tiny.samples.png"]


def test_each_cell_is_shown_by_its_lowest_finished_seed():
    from core.sweep.record import TrialRecord, TrialView

    def view(n, state, cell, seeds):
        rec = TrialRecord(cell=cell, seeds=seeds, metrics={s: {"psnr": 1.0} for s in seeds} if state == "COMPLETE" else {},
                          run_dirs={s: f"/r/{cell}{s}" for s in seeds}, run_ids={s: f"id{cell}{s}" for s in seeds})
        return TrialView(number=n, state=state, record=rec)

    trials = [view(0, "COMPLETE", "a", [2]), view(1, "FAIL", "a", [0]), view(2, "COMPLETE", "a", [1]),
              view(3, "COMPLETE", "b", [0]), view(4, "COMPLETE", "c", [3])]
    assert rg.pick_runs(trials, ["b", "a", "d"]) == {"b": (0, "/r/b0", "idb0"), "a": (1, "/r/a1", "ida1")}


def test_saved_sample_grid_layout_is_read_back_exactly(tmp_path):
    """A grid saved as the generation evaluator saves it (upscaled, 2 px padding) gives back its images."""
    from torchvision.utils import save_image

    imgs = torch.rand(6, 3, 8, 8)
    q = (imgs * 255 + 0.5).floor().clamp(0, 255) / 255  # the values save_image will store
    big = torch.nn.functional.interpolate(q, scale_factor=8, mode="nearest")
    save_image(big, str(tmp_path / "g.png"), nrow=3, padding=2)
    tiles = rg.sample_tiles(tmp_path / "g.png", 8, 3)
    assert len(tiles) == 2 and all(len(r) == 3 for r in tiles)
    for i in range(6):
        want = (q[i] * 255).round().byte().permute(1, 2, 0).numpy()
        assert np.array_equal(tiles[i // 3][i % 3], want)
    assert rg.sample_tiles(tmp_path / "g.png", 8, 4) is None  # not that layout: no tiles, no guess
