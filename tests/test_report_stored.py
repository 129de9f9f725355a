"""A finished study stays reportable when a plugin it used is uninstalled, also without a
``sweep.study_name`` (the experiment's only study is read as recorded); any other config error is
still an error, so a typo never reports another study's numbers."""
from __future__ import annotations

import yaml

from sweep_helpers import run_sweep, write_tiny

SPACE = {"model.quantizer": {"vq16": {"type": "vq", "codebook_size": 16, "code_dim": 4},
                             "fsq": {"type": "fsq", "levels": [5, 3]}}}


def _uninstall(path):
    raw = yaml.safe_load(path.read_text())
    raw["model"]["quantizer"]["type"] = "uninstalled"
    for choice in raw["sweep"]["space"]["model.quantizer"].values():
        choice["type"] = "uninstalled"
    path.write_text(yaml.safe_dump(raw))


def test_stored_study_without_a_name_is_reported_and_typos_stay_errors(tmp_path, monkeypatch, capsys):
    from core import report

    monkeypatch.chdir(tmp_path)
    path = write_tiny(tmp_path, **{"train.steps": 2, "sweep.seeds": [0], "sweep.space": SPACE, "tracking.enabled": False})
    assert run_sweep(path) == 0
    capsys.readouterr()
    # a typo is an error even though the study exists
    assert report.main([str(path), "train.stepz=3", "--out", str(tmp_path / "r0"), "--no-mlflow"]) == 2
    assert "train.stepz" in capsys.readouterr().err
    _uninstall(path)
    assert report.main([str(path), "--out", str(tmp_path / "r1"), "--no-mlflow"]) == 0
    err = capsys.readouterr().err
    assert "unknown quantizer 'uninstalled'" in err and "reporting the stored study 'tiny_sweep-" in err
    md = (tmp_path / "r1" / "tiny_sweep.md").read_text()
    assert "| vq16 | 1 |" in md and "| fsq | 1 |" in md
    # a second study of the same experiment: which one is meant can no longer be told from the config
    raw = yaml.safe_load(path.read_text())
    raw["sweep"]["space"] = SPACE
    raw["model"]["quantizer"] = {"type": "vq", "codebook_size": 16, "code_dim": 4}
    raw["train"]["steps"] = 3
    path.write_text(yaml.safe_dump(raw))
    assert run_sweep(path) == 0
    _uninstall(path)
    capsys.readouterr()
    assert report.main([str(path), "--out", str(tmp_path / "r2"), "--no-mlflow"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: sweep.study_name:") and "studies of 'tiny_sweep'" in err and len(err.splitlines()) == 1
