"""Grid sweeps: exact (conditional) cells, validation before running, MLflow parent/child runs,
kill-and-resume without repeating a cell, a failing cell recorded FAILED while the others finish."""
from __future__ import annotations

import signal
import time
from collections import Counter

import pytest

from core import sweep
from core.errors import ConfigError
from sweep_helpers import TINY_KEYS, cli, keys, load, run_sweep, trials, write_tiny


def _check(path, *overrides):
    raw, exp = load(path, *overrides)
    return sweep.check_all(raw, sweep.parse_sweep(exp.sweep))


def test_plan_enumerates_conditional_grid_exactly(tmp_path, capsys):
    path = write_tiny(tmp_path)
    cells = _check(path)
    assert {c.key for c in cells} == TINY_KEYS and len(cells) == 8
    raw, exp = load(path)
    assert sweep.main(str(path), raw, exp, dry_run=True) == 0
    out = capsys.readouterr().out
    assert "4 cells x 2 seeds = 8 runs" in out
    assert "rq/2: model.quantizer=rq, model.quantizer.codes_per_token=2" in out
    assert not (tmp_path / "journal.log").exists()  # a dry run writes nothing


def _space_with(**extra):
    space = {"model.quantizer": {"a": {"type": "vq", "codebook_size": 16, "code_dim": 4}}}
    space.update(extra)
    return space


@pytest.mark.parametrize("space, sweep_changes, expected", [
    ({"model.quantizer": {"a": {"type": "mcq", "codes_per_token": 2, "codebook_size": 8, "code_dimm": 2}}}, {},
     "sweep.space.model.quantizer.a.code_dimm: unknown key"),
    ({"model.quantizer": {"a": {"type": "vqq"}}}, {}, "sweep.space.model.quantizer.a.type: unknown quantizer 'vqq'"),
    (_space_with(**{"model.quantizer.codes_per_token": {"choices": [1], "when": {"model.quantizer": "b"}}}), {},
     "sweep.space.model.quantizer.codes_per_token.when.model.quantizer: no choice 'b'"),
    (_space_with(**{"train.optimizer.lr": {"low": 1e-4, "high": 1e-2}}), {}, "sweep.space.train.optimizer.lr: a range in a grid needs a step"),
    (_space_with(**{"train.lrr": [1, 2]}), {}, "sweep.space.train.lrr: unknown key"),
    (_space_with(**{"variant": {"x": {"train.steps": 0}}}), {}, "sweep.space.variant.x.train.steps: input should be greater than 0"),
    (_space_with(), {"sampler": "tpe"}, "sweep.n_trials: required with sampler tpe"),
    (_space_with(), {"seeds": [1, 1]}, "sweep.seeds: repeated seed"),
    (_space_with(), {"workerz": 2}, "sweep.workerz: unknown key"),
])
def test_bad_sweeps_fail_before_running_naming_the_path(tmp_path, space, sweep_changes, expected):
    changes = {"sweep.space": space, **{f"sweep.{k}": v for k, v in sweep_changes.items()}}
    path = write_tiny(tmp_path, **changes)
    with pytest.raises(ConfigError) as e:
        _check(path)
    assert str(e.value).startswith(expected), str(e.value)
    assert not (tmp_path / "journal.log").exists() and not (tmp_path / "runs").exists()


def _mlflow_runs(tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny_sweep")
    return client.search_runs([exp.experiment_id], max_results=1000)


def test_kill_after_three_cells_then_rerun_completes_the_rest_once(tmp_path):
    path = write_tiny(tmp_path, **{"train.steps": 40})
    proc = cli([str(path)], tmp_path)
    deadline = time.time() + 240
    done: list = []
    while time.time() < deadline and proc.poll() is None:
        if (tmp_path / "journal.log").exists():
            done = keys(trials(path))
            if len(done) >= 3:
                break
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = {t.record.key: t.number for t in trials(path) if t.state == "COMPLETE"}
    assert 3 <= len(first) < 8, proc.stdout.read()[-2000:]

    assert run_sweep(path) == 0
    final = trials(path)
    complete = [t for t in final if t.state == "COMPLETE"]
    counts = Counter(t.record.key for t in complete)
    assert set(counts) == TINY_KEYS and max(counts.values()) == 1  # every cell once
    assert all(t.number == first[t.record.key] for t in complete if t.record.key in first)
    assert all(t.state in ("COMPLETE", "FAIL") for t in final)  # the killed one became FAIL

    runs = _mlflow_runs(tmp_path)
    parents = [r for r in runs if r.data.tags.get("vtok.sweep") == "parent"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    pid = parents[0].info.run_id
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == pid and r.info.status == "FINISHED"]
    assert len(children) == 8
    assert {f"{r.data.tags['vtok.cell']}#seed={r.data.tags['vtok.seed']}" for r in children} == TINY_KEYS
    assert {r.data.params["sweep.model.quantizer"] for r in children} == {"vq16", "mcq2x8", "rq"}
    assert all("psnr" in r.data.metrics and "paper.source" not in r.data.params for r in children)
    assert not [r for r in runs if r.info.status == "RUNNING"]  # the killed worker's run was closed


def test_failing_cell_is_recorded_and_the_others_finish(tmp_path):
    space = {"variant": {"ok": {"train.steps": 2}, "bad": {"data.train_size": 4}}}  # batch 8 > 4 images
    path = write_tiny(tmp_path, **{"sweep.space": space, "sweep.seeds": [0]})
    assert run_sweep(path) == 1
    by_cell = {t.record.cell: t for t in trials(path)}
    assert by_cell["ok"].state == "COMPLETE" and by_cell["ok"].value > 0
    assert by_cell["bad"].state == "FAIL"
    assert "larger than the training set" in by_cell["bad"].record.error
    runs = {r.data.tags.get("vtok.cell"): r for r in _mlflow_runs(tmp_path)}
    assert runs["bad"].info.status == "FAILED" and "training set" in runs["bad"].data.tags["vtok.error"]
    assert runs["ok"].info.status == "FINISHED"
    assert runs[None].info.status == "FAILED"  # the parent: not every cell finished

    assert run_sweep(path) == 1  # re-run: only the failed cell runs again
    counts = Counter((t.record.cell, t.state) for t in trials(path))
    assert counts == {("ok", "COMPLETE"): 1, ("bad", "FAIL"): 2}


def test_error_is_rooted_at_the_most_specific_sweep_key(tmp_path):
    space = {"model.quantizer": {"rq": {"type": "rq", "codes_per_token": 2, "codebook_size": 8, "code_dim": 4}},
             "model.quantizer.codes_per_token": {"choices": [0], "when": {"model.quantizer": "rq"}}}
    path = write_tiny(tmp_path, **{"sweep.space": space})
    with pytest.raises(ConfigError, match=r"^sweep\.space\.model\.quantizer\.codes_per_token: input should be greater than or equal to 1 \(got 0\) \(choice 0\)$"):
        _check(path)


def test_orphaned_child_run_of_a_dead_trial_is_closed(in_tmp):
    """A worker killed after creating its MLflow run but before recording its id on the trial."""
    from mlflow.tracking import MlflowClient

    from core.config import TrackingConfig
    from core.sweep.runs import close_runs
    from core.tracking import resolve_uri

    client = MlflowClient(resolve_uri(None))
    exp_id = client.create_experiment("orphans")
    parent = client.create_run(exp_id).info.run_id
    orphan = client.create_run(exp_id, tags={"mlflow.parentRunId": parent, "vtok.trial": "3"}).info.run_id
    alive = client.create_run(exp_id, tags={"mlflow.parentRunId": parent, "vtok.trial": "4"}).info.run_id
    close_runs([], TrackingConfig(), "KILLED", parent, {"3"})
    assert client.get_run(orphan).info.status == "KILLED"
    assert client.get_run(alive).info.status == "RUNNING"
