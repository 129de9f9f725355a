"""Every shipped experiment validates (every sweep cell, every claim's cell names) and trains 2 steps.

By default one representative cell per sweep file runs (its last cell: usually the richest); the
exhaustive check of every cell is ``-m slow``. The UniWeTok files distil from vtok's own CLIP
(experiments/clip_teacher.yaml), trained here for 2 steps and linked at runs/clip_teacher.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from core import report, sweep
from core.config import apply_overrides, read_yaml, validate
from core.trainer import train

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted((ROOT / "experiments").glob("*.yaml"))
SWEEPS = [p for p in FILES if "sweep" in read_yaml(p)]


def tiny_overrides(raw: dict, out: Path) -> list[str]:
    """2 steps, small eval, no tracking, one seed; the fd reference net trains 2 steps."""
    o = ["train.steps=2", "train.batch_size=8", "train.eval_size=32", "train.eval_batch_size=32",
         "train.eval_every=0", "tracking.enabled=false", f"train.out_dir={out / 'runs'}"]
    o += [f"eval.{i}.reference.steps=2" for i, e in enumerate(raw.get("eval", [])) if e.get("type") in ("fd", "generation")]
    o += [f"eval.{i}.{k}" for i, e in enumerate(raw.get("eval", [])) if e.get("type") == "generation"
          for k in ("steps=2", "train_images=16", "n_samples=8", "grid_per_class=1")]
    if "sweep" in raw:
        o += ["sweep.seeds=[0]", "sweep.workers=1", "sweep.threads_per_worker=1", f"sweep.storage={out / 'journal.log'}"]
        if raw["sweep"].get("sampler") == "tpe":
            o += ["sweep.n_trials=1"]
    return o


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A working directory holding runs/clip_teacher (a 2-step teacher) and the fd cache."""
    d = tmp_path_factory.mktemp("experiments")
    old, old_cache = os.getcwd(), os.environ.get("VTOK_CACHE")
    os.chdir(d)
    os.environ["VTOK_CACHE"] = str(d / "cache")
    try:
        raw = read_yaml(ROOT / "experiments" / "clip_teacher.yaml")
        teacher = validate(apply_overrides(raw, tiny_overrides(raw, d / "teacher")))
        result = train(teacher)
        (d / "runs").mkdir(exist_ok=True)
        (d / "runs" / "clip_teacher").symlink_to(result.run_dir.resolve())
        yield d
    finally:
        os.chdir(old)
        if old_cache is None:
            os.environ.pop("VTOK_CACHE", None)
        else:
            os.environ["VTOK_CACHE"] = old_cache


def load_sweep(path: Path, out: Path):
    raw = read_yaml(path)
    raw = apply_overrides(raw, tiny_overrides(raw, out))
    exp = validate(raw)
    return raw, exp, sweep.parse_sweep(exp.sweep)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_every_experiment_validates_with_its_cells_and_claims(workdir, path):
    raw = read_yaml(path)
    exp = validate(raw)
    if not exp.sweep:
        return
    sw = sweep.parse_sweep(exp.sweep)
    checked = sweep.check_all(raw, sw)  # every grid cell's full config
    assert checked
    paper = report.parse_paper(exp.paper)
    assert paper.source, f"{path.name}: paper.source names the table or figure"
    if sw.sampler == "grid":
        rng = sw.seed_range  # seeds until decided: 3 in every cell, up to 10 where a claim is open
        assert rng is not None and (rng.min, rng.max) == (3, 10) and sw.seeds == [0, 1, 2], f"{path.name}: seeds {{min: 3, max: 10}}"
        labels = list(dict.fromkeys(sweep.cell_label(pt) for pt in sweep.grid_points(sw)))
        report.check_paper(paper, labels)
        assert paper.claims, f"{path.name}: states the paper's claims to check"
        assert sw.objective.metric in _metric_names(exp), f"{path.name}: objective metric is evaluated"
        for c in paper.claims:
            assert c.metric in _metric_names(exp), f"{path.name}: claim metric {c.metric} is evaluated"


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_dry_run_plans_the_seed_range(workdir, path, capsys):
    """``python -m core.run X.yaml --dry-run`` plans every shipped sweep: a grid's seed range as
    min to max seeds and the runs' range (max only in the cells a claim compares)."""
    import re

    from core.run import main

    assert main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    raw = read_yaml(path)
    if raw["sweep"].get("sampler") == "tpe":
        assert re.search(r"^# \d+ TPE trials x \d+ seeds", out, re.M), out
        return
    exp = validate(raw)
    sw = sweep.parse_sweep(exp.sweep)
    labels = list(dict.fromkeys(sweep.cell_label(pt) for pt in sweep.grid_points(sw)))
    compared = {c for claim in report.parse_paper(exp.paper).claims for c in claim.cells()}
    n = len(labels)
    most = 10 * len(compared) + 3 * (n - len(compared))
    assert f"# {n} cells x 3 to 10 seeds = {3 * n} to {most} runs: seeds 0..2 in every cell" in out, out
    assert not (workdir / "optuna_journal.log").exists()  # a plan writes nothing


def _metric_names(exp):
    """Matcher of the metrics the experiment's evaluators DECLARE (no hand-kept table)."""
    from core.evaluation import declared_metrics
    from core.plugins import get_registry

    declared = declared_metrics(exp, get_registry())
    return _Declared(declared)


class _Declared:
    def __init__(self, declared):
        self.declared = declared

    def __contains__(self, metric):
        from core.evaluation import matches

        return matches(metric, self.declared) is not None


def _run_cell(raw, sw, choices):
    exp = sweep.validate_cell(raw, sw, choices, sw.seeds[0])
    metrics = train(exp).metrics
    assert sw.objective.metric in metrics, sorted(metrics)
    return metrics


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_representative_cell_trains_two_steps(workdir, path):
    raw, exp, sw = load_sweep(path, workdir / path.stem)
    if sw.sampler == "grid":
        choices = sweep.grid_points(sw)[-1]
    else:
        choices = sweep.check_all(raw, sw)[-1].choices
    _run_cell(raw, sw, choices)


@pytest.mark.slow
@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_every_cell_trains_two_steps_through_the_sweep_engine(workdir, path):
    from optuna.trial import TrialState

    raw, exp, sw = load_sweep(path, workdir / f"{path.stem}-all")
    assert sweep.main(str(path), raw, exp) == 0
    study = sweep.open_study(exp, sw, create=False)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    expected = len(sweep.plan(sw)) if sw.sampler == "grid" else sw.n_trials
    assert states.count(TrialState.COMPLETE) == expected
