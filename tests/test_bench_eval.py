"""``python -m core.bench eval`` and ``cells``: they run, agree and reject bad input in one line."""
from __future__ import annotations

import yaml

from conftest import tiny_experiment
from core import bench


def test_bench_eval_times_both_paths_and_their_metrics_agree(tmp_path, capsys):
    exp = tiny_experiment(**{"eval": [{"type": "psnr_ssim"}, {"type": "usage"}]})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(exp))
    assert bench.main(["eval", str(path), "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "per-evaluator passes:" in out and "one shared pass:" in out and "metrics equal: True" in out


def test_bench_eval_bad_repeat_is_one_error_line(tmp_path, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_experiment()))
    assert bench.main(["eval", str(path), "--repeat", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --repeat")


def test_bench_cells_prints_before_after_and_ratio(tmp_path, capsys):
    exp = tiny_experiment()
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(exp))
    assert bench.main(["cells", str(path), "--steps", "2", "--repeats", "1", "--warmup", "1"]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1].split()
    before, after, ratio = map(float, row[2:5])
    assert row[0] == "tiny" and before > 0 and after > 0 and abs(ratio - after / before) < 0.01


def test_bench_cells_missing_file_is_one_error_line(tmp_path, capsys):
    assert bench.main(["cells", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "not found" in err[0]


def test_bench_cells_skips_a_cell_that_cannot_be_built_and_goes_on(tmp_path, capsys):
    student = tiny_experiment(**{"losses": [{"type": "pixel"}, {"type": "distill", "teacher": {"weights": str(tmp_path / "runs/nope")}}]})
    (tmp_path / "a_student.yaml").write_text(yaml.safe_dump(student))
    (tmp_path / "b_tiny.yaml").write_text(yaml.safe_dump(tiny_experiment()))
    args = ["cells", str(tmp_path / "a_student.yaml"), str(tmp_path / "b_tiny.yaml"), "--steps", "1", "--repeats", "1", "--warmup", "0"]
    assert bench.main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith("a_student") and "skipped:" in lines[-2] and lines[-1].startswith("b_tiny")
