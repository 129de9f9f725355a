"""``python -m core.reproduce``: planning (dependencies, --only, budget), results as data, the page."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest
import yaml

from core import reproduce as rp

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "name": "tiny",
    "data": {"type": "shapes", "image_size": 16, "train_size": 64},
    "model": {
        "encoder": {"type": "conv", "width": 8, "downsample": 4, "channel_mult": [1, 1]},
        "quantizer": {"type": "vq", "codebook_size": 16, "code_dim": 4},
        "decoder": {"type": "conv", "width": 8, "channel_mult": [1, 1]},
    },
    "losses": [{"type": "pixel"}, {"type": "quantizer"}],
    "train": {"steps": 2, "batch_size": 8, "eval_size": 16, "eval_every": 1, "progress": False, "optimizer": {"lr": 1.0e-3}},
    "eval": [{"type": "psnr_ssim"}],
    "sweep": {
        "seeds": [0, 1],
        "space": {"model.quantizer": {"vq16": {"type": "vq", "codebook_size": 16, "code_dim": 4},
                                      "vq4": {"type": "vq", "codebook_size": 4, "code_dim": 4}}},
        "objective": {"metric": "psnr", "direction": "maximize"},
        "threads_per_worker": 1,
    },
    "paper": {"source": "UniTok Table 99: a test", "metrics": {"psnr": "higher"}, "figures": {"vq16": {"PSNR": 20.5}},
              "claims": [{"text": "more codes reconstruct better", "better": "vq16", "than": "vq4", "metric": "psnr"}]},
}
ARGS = ["--experiments-dir", "experiments", "--results-dir", "results", "--page", "docs/RESULTS.md"]


def write_tiny(d: Path, tracking: bool) -> Path:
    cfg = json.loads(json.dumps(TINY))
    cfg["tracking"] = {"uri": f"sqlite:///{d / 'mlflow.db'}"} if tracking else {"enabled": False}
    cfg["train"]["out_dir"] = str(d / "runs")
    cfg["sweep"]["storage"] = str(d / "journal.log")
    (d / "experiments").mkdir(exist_ok=True)
    path = d / "experiments" / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def trial_records(path: Path) -> list:
    from core.config import read_yaml, validate
    from core.sweep import results, study as st

    exp = validate(read_yaml(path))
    return st.read_trials(results.find_study(exp, exp.sweep))


# ------------------------------------------------------------------------------------------------
# the committed page
# ------------------------------------------------------------------------------------------------


def test_committed_page_is_built_from_committed_data():
    """docs/RESULTS.md is exactly what ``--report-only`` builds from results/ and experiments/."""
    built = rp.page_text(ROOT / "experiments", ROOT / "results")
    assert (ROOT / "docs" / "RESULTS.md").read_text() == built, \
        "docs/RESULTS.md is stale: rebuild it with python -m core.reproduce --report-only"


def test_committed_page_lists_every_claim_of_every_paper_experiment():
    from core.sweep.paper import parse_paper

    exps = rp.discover(ROOT / "experiments")
    names = {e.name for e in exps.values() if e.paper}
    assert {"hpo", "uniwetok_losses", "uniwetok_siglu", "uniwetok_ppd", "uniwetok_bottleneck", "uniwetok_gap"} <= names
    page = (ROOT / "docs" / "RESULTS.md").read_text()
    table = page.split("## Every claim")[1].split("\n## ")[0]
    rows = [r for r in table.splitlines() if r.startswith("| ") and not r.startswith("| paper |")]
    assert len(rows) == sum(len(parse_paper(exps[n].raw["paper"]).claims) for n in names)
    for n in names:
        assert f"\n## {n}\n" in page


# ------------------------------------------------------------------------------------------------
# dependencies and --only
# ------------------------------------------------------------------------------------------------


def _write(d: Path, name: str, cfg: dict) -> None:
    d.mkdir(exist_ok=True)
    (d / f"{name}.yaml").write_text(yaml.safe_dump({"name": name, **cfg}, sort_keys=False))


SWEEP = {"space": {"a": [1, 2]}, "objective": {"metric": "psnr"}}


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """A teacher (single run under runs/teacher), a distilling paper experiment, a plain one, a non-paper file."""
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "experiments"
    _write(d, "teacher", {"train": {"steps": 5}})
    _write(d, "a_plain", {"sweep": SWEEP, "paper": {"source": "UniTok Table 1"}})
    _write(d, "b_student", {"losses": [{"type": "distill", "teacher": {"kind": "vtok", "weights": "runs/teacher"}}],
                            "sweep": SWEEP, "paper": {"source": "UniWeTok Table 2"}})
    _write(d, "quick", {"train": {"steps": 5}})  # no paper section: not run by default
    return rp.discover(d)


def names(plan):
    return [e.name for e, _ in plan]


def test_teacher_is_added_before_its_student_when_missing(toy, tmp_path):
    assert names(rp.resolve(None, toy)) == ["a_plain", "teacher", "b_student"]
    assert names(rp.resolve(["b_student"], toy)) == ["teacher", "b_student"]
    assert names(rp.resolve(["a_plain"], toy)) == ["a_plain"]
    # an interrupted teacher (a checkpoint, no finished marker) is still missing: it is resumed first
    (tmp_path / "runs" / "teacher-0123abcd" / "checkpoints").mkdir(parents=True)
    assert names(rp.resolve(["b_student"], toy)) == ["teacher", "b_student"]


def test_teacher_is_not_added_when_a_finished_run_is_there(toy, tmp_path):
    from core import rundir

    run = tmp_path / "runs" / "teacher-0123abcd"
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    rundir.write_complete(run, {"zero_shot_top1": 50.0}, None)
    assert names(rp.resolve(["b_student"], toy)) == ["b_student"]
    assert names(rp.resolve(None, toy)) == ["a_plain", "b_student"]
    # asked for by name, it runs (a finished run is not repeated by core.run)
    assert names(rp.resolve(["teacher", "b_student"], toy)) == ["b_student", "teacher"]
    # a newer, unfinished teacher run is the one the student would load: the teacher is resumed first
    newer = tmp_path / "runs" / "teacher-4567cdef"
    (newer / "checkpoints" / "step_00000001").mkdir(parents=True)
    os.utime(newer / "checkpoints" / "step_00000001", (time.time() + 10, time.time() + 10))
    assert names(rp.resolve(["b_student"], toy)) == ["teacher", "b_student"]


def test_shipped_uniwetok_files_depend_on_the_clip_teacher(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/ here: the teacher is missing
    exps = rp.discover(ROOT / "experiments")
    uni = [n for n in exps if n.startswith("uniwetok_")]
    assert len(uni) == 5
    for n in uni:
        assert [rp.producer(w, exps).name for w in exps[n].teachers] == ["clip_teacher"]
    assert names(rp.resolve(["uniwetok_gap"], exps)) == ["clip_teacher", "uniwetok_gap"]
    plan = names(rp.resolve(None, exps))
    assert plan.count("clip_teacher") == 1 and plan.index("clip_teacher") < min(plan.index(n) for n in uni)
    assert "hpo" in plan and "quickstart" not in plan


def test_unknown_only_name_is_one_error_line_exit_2(toy, tmp_path, capsys):
    assert rp.main(["--experiments-dir", "experiments", "--only", "a_plain", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --only: unknown experiment 'nope' (experiments: a_plain,")
    assert not (tmp_path / "results").exists() and not (tmp_path / "docs").exists()


@pytest.mark.parametrize("argv, where", [
    (["--budget-minutes", "0"], "error: --budget-minutes: must be a positive"),
    (["--budget-minutes", "-5"], "error: --budget-minutes: must be a positive"),
    (["--budget-minutes", "nan"], "error: --budget-minutes: must be a positive"),
    (["--budget-minutes", "soon"], "error: --budget-minutes: invalid float value"),
    (["--report-only", "--only", "a_plain"], "error: --report-only: "),
    (["--experiments-dir", "missing"], "error: --experiments-dir: missing: not a directory"),
])
def test_bad_command_lines(toy, tmp_path, capsys, argv, where):
    assert rp.main(["--experiments-dir", "experiments", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(where)
    assert not (tmp_path / "results").exists() and not (tmp_path / "docs").exists()


def test_dry_run_prints_the_plan(toy, capsys):
    assert rp.main(["--experiments-dir", "experiments", "--dry-run", "--only", "b_student"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "vtok reproduce: 2 experiment(s), no budget"
    assert out[1].startswith("1. teacher (experiments/teacher.yaml): single run, 5 steps; teacher of b_student: no finished run at runs/teacher")
    assert out[2].startswith("2. b_student (experiments/b_student.yaml): grid 2 cells x seeds [0], None steps; selected; "
                             "needs runs/teacher (missing)")


# ------------------------------------------------------------------------------------------------
# running: budget, stops, failures (a fake runner and clock: no training)
# ------------------------------------------------------------------------------------------------


class Fake:
    def __init__(self, minutes: float = 10.0, codes: dict | None = None):
        self.now, self.minutes, self.codes, self.calls = 0.0, minutes, codes or {}, []

    def clock(self) -> float:
        return self.now

    def run(self, e, overrides) -> int:
        self.calls.append((e.name, overrides))
        self.now += 60 * self.minutes
        return self.codes.get(e.name, 0)


def test_budget_stops_starting_new_experiments(toy, tmp_path, capsys):
    fake = Fake(minutes=10)
    plan = rp.resolve(None, toy)  # a_plain, teacher, b_student
    code = rp.run_plan(plan, tmp_path / "results", 15, fake.run, lambda e, o: None, fake.clock)
    assert code == 0
    assert [n for n, _ in fake.calls] == ["a_plain", "teacher"]  # started at 0 and 10 min; 20 >= 15: stop
    err = capsys.readouterr().err
    assert "the budget of 15 min is spent (20.0 min); not started: b_student" in err
    assert "[1/3] a_plain (" in err and "[2/3] teacher: 1/1 runs done" not in err  # the fake wrote no run


def test_seed_range_gets_the_budget_left(toy, tmp_path):
    e = toy["a_plain"]
    e.raw["sweep"] = {**SWEEP, "seeds": {"min": 3, "max": 10, "budget_minutes": 100}}
    fake = Fake(minutes=4)
    rp.run_plan([(toy["teacher"], ""), (e, "")], tmp_path / "results", 30, fake.run, lambda e, o: None, fake.clock)
    assert fake.calls == [("teacher", []), ("a_plain", ["sweep.seeds.budget_minutes=26.00"])]
    e.raw["sweep"]["seeds"]["budget_minutes"] = 5
    fake.calls.clear()
    rp.run_plan([(e, "")], tmp_path / "results", 30, fake.run, lambda e, o: None, fake.clock)
    assert fake.calls == [("a_plain", ["sweep.seeds.budget_minutes=5.00"])]
    fake.calls.clear()
    fake.now = 0.0
    rp.run_plan([(toy["teacher"], ""), (e, "")], tmp_path / "results", 4.0001, fake.run, lambda e, o: None, fake.clock)
    assert fake.calls[1] == ("a_plain", ["sweep.seeds.budget_minutes=0.01"])  # never 0 (an invalid budget)
    fake.calls.clear()
    rp.run_plan([(e, "")], tmp_path / "results", None, fake.run, lambda e, o: None, fake.clock)
    assert fake.calls == [("a_plain", [])]  # no budget: the file's own


def test_interrupt_stops_the_plan(toy, tmp_path, capsys):
    fake = Fake(codes={"a_plain": 130})
    assert rp.run_plan(rp.resolve(None, toy), tmp_path / "results", None, fake.run, lambda e, o: None, fake.clock) == 130
    assert [n for n, _ in fake.calls] == ["a_plain"]
    assert "interrupted; run the same command to resume" in capsys.readouterr().err


def test_failed_teacher_skips_its_students(toy, tmp_path, capsys):
    fake = Fake(codes={"teacher": 1})
    assert rp.run_plan(rp.resolve(None, toy), tmp_path / "results", None, fake.run, lambda e, o: None, fake.clock) == 1
    assert [n for n, _ in fake.calls] == ["a_plain", "teacher"]
    assert "b_student: skipped, its teacher (runs/teacher) failed" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# results as data
# ------------------------------------------------------------------------------------------------


def sample_record(**changes) -> dict:
    rec = {
        "schema": rp.SCHEMA, "experiment": "demo", "file": "experiments/demo.yaml", "study": "demo-0123abcd",
        "git": {"commit": "abc", "dirty": False}, "dataset": {"type": "shapes", "image_size": 32}, "steps": 300,
        "sampler": "grid", "objective": {"metric": "psnr", "direction": "maximize"},
        "planned_seeds": {"min": 3, "max": 10}, "seeds": {"a": [0, 1, 2], "b": [0, 1, 2]},
        "runs": {"finished": 6, "failed": 0, "wall_s": 123.456789, "busy_s": 240.0},
        "paper": {"source": "UniTok Table 8: demo", "note": "", "figures": {"a": {"rFID": 1.5}, "b": {"rFID": None}}, "alpha": 0.05},
        "metrics": [["psnr", "higher"], ["fd_refnet", "lower"]], "cell_order": ["b", "a"],
        "cells": {"a": {"0": {"psnr": 1.0, "fd_refnet": 5.0}, "1": {"psnr": 2.0, "fd_refnet": float("nan")}, "2": {"psnr": 3.0}},
                  "b": {0: {"psnr": 0.123456789}, 1: {"psnr": 0.5}, 2: {"psnr": 1.0}}},
        "claims": [{"index": 0, "text": "a beats b", "kind": "better", "metric": "psnr", "cells": ["a", "b"],
                    "verdict": "inconclusive", "test": "paired t", "n": 3, "mean_diff": 1.4588, "ci": [-0.5, 3.4],
                    "ci_level": 0.95, "p": 0.1, "seeds_needed": 7, "paper_figures": {"a": {"rFID": 1.5}},
                    "diffs": {"0": 0.877, "1": 1.5, "2": 2.0}, "a_field_report_adds_later": [1, 2]}],
        "curves": {"psnr": {"a": {"0": [[100, 0.5], [300, 1.0]]}}},
    }
    rec.update(changes)
    return rec


def test_results_file_round_trip_is_stable(tmp_path):
    path = rp.write_results(sample_record(), tmp_path)
    text = path.read_text()
    data = json.loads(text)
    assert data["cells"]["b"]["0"]["psnr"] == 0.123457  # 6 significant digits
    assert data["cells"]["a"]["1"]["fd_refnet"] is None  # nan -> null
    assert data["runs"]["wall_s"] == 123.457
    assert list(data) == sorted(data)  # sorted keys: diffs are line-local
    loaded = rp.load_results(tmp_path)["demo"]
    assert rp.dumps(loaded) == text  # load -> dump gives the same bytes (extra claim fields kept)
    assert loaded["claims"][0]["a_field_report_adds_later"] == [1, 2]


def test_a_broken_results_file_is_one_error(tmp_path):
    bad = sample_record()
    del bad["cells"]
    (tmp_path / "demo.json").write_text(json.dumps(bad))
    with pytest.raises(rp.ConfigError, match=r"demo\.json: not a results file"):
        rp.load_results(tmp_path)
    with pytest.raises(Exception):
        rp.write_results(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_page_numbers_from_a_record(toy, tmp_path):
    """Cell means with their 95% t interval, the claim's effect, paper figures, 'not run' for the rest."""
    rec = sample_record(experiment="a_plain")
    rp.write_results(rec, tmp_path / "results")
    page = rp.page_text(tmp_path / "experiments", tmp_path / "results")
    # a: psnr 1, 2, 3 -> mean 2, half-width t(0.975, 2) * 1 / sqrt(3) = 4.303 / 1.732 = 2.484
    assert "| a | 0, 1, 2 | 2.00 ± 2.48 | 5.00 | 1.5 |" in page
    # b (listed first: cell_order) -> 0.123457, 0.5, 1.0: mean 0.541152, sd 0.439718, half 4.303 * 0.253871 = 1.09241
    assert "| b | 0, 1, 2 | 0.541 ± 1.092 | – | – |" in page
    assert ("| UniTok | Table 8 | a beats b | psnr | a: rFID 1.5 | +1.46 [-0.5, 3.4] | **inconclusive** (≈7 seeds) "
            "| shapes 32 px | [a_plain](#a_plain) |") in page
    assert "| UniWeTok | Table 2 |" not in page  # b_student has no claims
    assert "1 of 2 paper experiments have results; 1 claims: 0 decided" in page
    assert "**Not run.** Planned: grid 2 cells, ?. Run it with `python -m core.reproduce --only b_student`." in page
    assert "![learning curves](results/a_plain.curves.png)" in page


# ------------------------------------------------------------------------------------------------
# end to end on a tiny experiment
# ------------------------------------------------------------------------------------------------


def test_tiny_end_to_end_and_rerun_repeats_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = write_tiny(tmp_path, tracking=False)
    assert rp.main(ARGS) == 0
    err = capsys.readouterr().err
    assert "vtok reproduce: [1/1] tiny: 4/4 runs done, 0 failed" in err
    data = json.loads((tmp_path / "results" / "tiny.json").read_text())
    assert data["cell_order"] == ["vq16", "vq4"] and data["seeds"] == {"vq16": [0, 1], "vq4": [0, 1]}
    assert data["steps"] == 2 and data["dataset"] == {"type": "shapes", "image_size": 16}
    assert data["curves"] == {}  # no tracking, no histories
    assert data["runs"]["finished"] == 4 and len(data["git"]["commit"]) == 40
    # the stored numbers are the trials' own, and the claim's effect is their paired mean difference
    trials = trial_records(path)
    assert len(trials) == 4
    for t in trials:
        for seed, m in t.record.metrics.items():
            assert data["cells"][t.record.cell][str(seed)]["psnr"] == float(f"{m['psnr']:.6g}")
    (claim,) = data["claims"]
    d = [data["cells"]["vq16"][s]["psnr"] - data["cells"]["vq4"][s]["psnr"] for s in ("0", "1")]
    assert math.isclose(claim["mean_diff"], sum(d) / 2, rel_tol=1e-4, abs_tol=1e-5)
    assert claim["n"] == 2 and claim["test"] == "paired t" and claim["text"] == "more codes reconstruct better"
    page = (tmp_path / "docs" / "RESULTS.md").read_text()
    assert page == rp.page_text("experiments", "results")
    assert "| UniTok | Table 99 | more codes reconstruct better | psnr | vq16: PSNR 20.5 |" in page
    assert (tmp_path / "docs" / "results" / "tiny.claims.png").is_file()
    # run again: every run is done, nothing trains, the record is the same numbers
    assert rp.main(ARGS) == 0
    assert "0 of 4 runs done" not in capsys.readouterr().err
    assert len(trial_records(path)) == 4
    again = json.loads((tmp_path / "results" / "tiny.json").read_text())
    assert again["cells"] == data["cells"] and again["claims"] == data["claims"]
    # --report-only rebuilds the same page from the data alone
    (tmp_path / "docs" / "RESULTS.md").unlink()
    assert rp.main(["--report-only", *ARGS]) == 0
    assert (tmp_path / "docs" / "RESULTS.md").read_text() == page


@pytest.mark.slow
def test_tiny_with_tracking_stores_learning_curves(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_tiny(tmp_path, tracking=True)
    assert rp.main(ARGS) == 0
    data = json.loads((tmp_path / "results" / "tiny.json").read_text())
    curve = data["curves"]["psnr"]
    assert set(curve) == {"vq16", "vq4"} and set(curve["vq4"]) == {"0", "1"}
    for cell, by_seed in curve.items():
        for seed, points in by_seed.items():
            assert [s for s, _ in points] == [1, 2]  # eval_every 1 over 2 steps
            assert points[-1][1] == data["cells"][cell][seed]["psnr"]  # the last evaluation is the final metric
    assert (tmp_path / "docs" / "results" / "tiny.curves.png").is_file()


def test_ctrl_c_outside_a_run_stops_the_plan_with_130(toy, tmp_path):
    def collector(e, overrides):
        raise KeyboardInterrupt

    fake = Fake()
    assert rp.run_plan(rp.resolve(None, toy), tmp_path / "results", None, fake.run, collector, fake.clock) == 130
    assert [n for n, _ in fake.calls] == ["a_plain"]


@pytest.mark.slow
def test_killed_and_rerun_repeats_no_finished_run(tmp_path, monkeypatch, capsys):
    """SIGINT to ``python -m core.reproduce`` after the first run landed, then the same command:
    every (cell, seed) has exactly one finished trial, the interrupted one resumed from its checkpoint."""
    import os
    import signal
    import subprocess
    import sys

    monkeypatch.chdir(tmp_path)
    path = write_tiny(tmp_path, tracking=False)
    cfg = yaml.safe_load(path.read_text())
    cfg["train"].update(steps=200, eval_every=0, ckpt_every=0)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "core.reproduce", *ARGS], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith("[1/4] "):  # the first run landed; the second is training
            proc.send_signal(signal.SIGINT)
            break
    _, rest = proc.communicate(timeout=120)
    assert proc.returncode == 130, "".join(seen) + rest
    assert "interrupted; run the same command to resume" in rest
    first = {t.record.key: t.number for t in trial_records(path) if t.state == "COMPLETE"}
    assert len(first) == 1
    assert rp.main(ARGS) == 0
    err = capsys.readouterr().err
    assert "1 of 4 runs done" in err and "resuming" in err
    done = [t for t in trial_records(path) if t.state == "COMPLETE"]
    assert sorted(t.record.key for t in done) == sorted({f"{c}#seed={s}" for c in ("vq16", "vq4") for s in (0, 1)})
    assert {k: n for k, n in first.items()} == {t.record.key: t.number for t in done if t.record.key in first}
    assert json.loads((tmp_path / "results" / "tiny.json").read_text())["runs"]["finished"] == 4


@pytest.mark.slow
def test_shipped_teacher_and_student_shrunk_run_in_dependency_order(tmp_path, monkeypatch, capsys):
    """clip_teacher.yaml and uniwetok_siglu.yaml as shipped, shrunk to 2 steps at 16 px: asking for
    the student trains the teacher first, then the student distils from it and gets its record."""
    from core.config import read_yaml, set_dotted

    monkeypatch.chdir(tmp_path)
    d = tmp_path / "experiments"
    d.mkdir()
    small = {"data.image_size": 16, "data.train_size": 64, "train.steps": 2, "train.batch_size": 8, "train.eval_size": 16,
             "train.progress": False, "tracking": {"enabled": False}}
    for name, extra in (("clip_teacher", {}),
                        ("uniwetok_siglu", {"eval": [{"type": "psnr_ssim"}, {"type": "linear_probe"}],
                                            "paper.metrics": {"linear_probe_top1": "higher", "psnr": "higher"},
                                            "sweep.workers": 1, "sweep.seeds": [0, 1], "sweep.storage": "journal.log"})):
        raw = read_yaml(ROOT / "experiments" / f"{name}.yaml")
        for k, v in {**small, **extra}.items():
            set_dotted(raw, k.split("."), v)
        (d / f"{name}.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    assert rp.main([*ARGS, "--only", "uniwetok_siglu"]) == 0
    err = capsys.readouterr().err
    assert err.index("[1/2] clip_teacher") < err.index("[2/2] uniwetok_siglu")
    assert "[1/2] clip_teacher: 1/1 runs done" in err and "[2/2] uniwetok_siglu: 6/6 runs done, 0 failed" in err
    assert rp.teacher_ready("runs/clip_teacher")
    data = json.loads((tmp_path / "results" / "uniwetok_siglu.json").read_text())
    assert [c["metric"] for c in data["claims"]] and all(c["verdict"] in ("holds", "does not hold", "inconclusive")
                                                          for c in data["claims"])
    assert names(rp.resolve(["uniwetok_siglu"], rp.discover(d))) == ["uniwetok_siglu"]  # the teacher is there now
