"""The bad-input corpus (tests/bad_inputs/): every case exits 2 with one line naming the problem,
no traceback, no MLflow run, no files left behind."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from core.run import main

HERE = Path(__file__).parent / "bad_inputs"
CASES = yaml.safe_load((HERE / "cases.yaml").read_text())


def test_corpus_is_large_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['file']}{'+' + ' '.join(c.get('args', [])) if c.get('args') else ''}")
def test_bad_input_exits_2_with_one_line(case, in_tmp, capsys):
    before = sorted(p.name for p in in_tmp.iterdir())
    code = main([str(HERE / case["file"]), *case.get("args", [])])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert case["expect"] in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert sorted(p.name for p in in_tmp.iterdir()) == before  # no runs/, no mlflow.db, nothing


@pytest.mark.parametrize("name", ["alias_bomb.yaml", "missing_teacher_file.yaml", "resume_from_missing_checkpoint.yaml"])
def test_bad_input_in_a_fresh_process(name, tmp_path):
    p = subprocess.run([sys.executable, "-m", "core.run", str(HERE / name)], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert p.returncode == 2
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    assert list(tmp_path.iterdir()) == []
