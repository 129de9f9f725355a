"""TPE sweeps: the trial budget over re-runs, suggested values inside the space, the objective as the
mean over seeds, pruning from the periodic evaluations, and the report over trials."""
from __future__ import annotations

import optuna
import pytest
from sweep_helpers import load, run_sweep, trials, write_tiny

from core import report, sweep

SPACE = {"train.optimizer.lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
         "model.quantizer.codebook_size": {"low": 8, "high": 32, "integer": True, "step": 8}}


def tpe_file(tmp_path, **changes):
    return write_tiny(tmp_path, **{"sweep.sampler": "tpe", "sweep.n_trials": 3, "sweep.space": SPACE,
                                   "train.steps": 2, "tracking.enabled": False, **changes})


def test_tpe_runs_its_budget_once_and_values_are_seed_means(tmp_path):
    path = tpe_file(tmp_path)
    assert run_sweep(path) == 0
    done = [t for t in trials(path) if t.state == "COMPLETE"]
    assert len(done) == 3
    for t in done:
        assert 1e-4 <= t.params["train.optimizer.lr"] <= 1e-2 and t.params["model.quantizer.codebook_size"] in (8, 16, 24, 32)
        assert t.record.choices == t.params
        per_seed = t.record.metrics
        assert sorted(per_seed) == [0, 1]
        assert t.value == pytest.approx((per_seed[0]["psnr"] + per_seed[1]["psnr"]) / 2)
    assert run_sweep(path) == 0  # the budget is spent: a re-run adds nothing
    assert len(trials(path)) == 3

    raw, exp = load(path)
    md, info = report.build_report(raw, exp)
    assert "| #0 | 2 |" in md or "| #1 | 2 |" in md  # trials as rows, best first
    assert info["order"][0] == f"#{max(done, key=lambda t: t.value).number}"


def test_pruned_trial_is_recorded_pruned_from_a_periodic_evaluation(tmp_path):
    path = tpe_file(tmp_path, **{"train.steps": 3, "train.eval_every": 1,
                                  "sweep.pruning": {"startup_trials": 0, "warmup_evals": 0}})
    raw, exp = load(path)
    sw = exp.sweep
    study = sweep.open_study(exp, sw)
    trial = study.ask()
    choices = sweep.suggest(trial, sw)
    calls = []
    trial.should_prune = lambda: calls.append(1) or True  # the median pruner's decision, forced
    rec = sweep.TrialRecord(cell=sweep.cell_label(choices), choices=choices, seeds=[0, 1])
    assert sweep.run_trial(study, trial, rec, raw, sw, None, prune=True) == "PRUNED"
    t = study.get_trials()[0]
    assert t.state.name == "PRUNED" and calls == [1]
    assert list(t.intermediate_values) == [1]  # reported at the first evaluation (step 1), then stopped
    assert t.intermediate_values[1] > 0


def test_tpe_checks_both_ends_of_every_range_before_running(tmp_path):
    from core.errors import ConfigError

    path = tpe_file(tmp_path, **{"sweep.space": {"train.optimizer.lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
                                                 "train.warmup": {"low": 0.0, "high": -1.0}}})
    with pytest.raises(ConfigError, match=r"sweep\.space\.train\.warmup: high -1.0 is below low 0.0"):
        load(path)  # the sweep is validated with the rest of the experiment, every cell with it
    path = tpe_file(tmp_path, **{"sweep.space": {"train.min_lr_ratio": {"low": 0.5, "high": 2.0}}})
    with pytest.raises(ConfigError, match=r"sweep\.space\.train\.min_lr_ratio: input should be less than or equal to 1"):
        load(path)
    assert optuna.__version__  # the engine's dependency is importable


def test_two_tpe_workers_never_run_the_same_parameters_nor_share_a_run_directory(tmp_path):
    """main: both workers' samplers started from the same seed, so trials 0 and 1 drew the same
    parameters and trained into the same run directory at the same time."""
    import json
    from pathlib import Path

    from core import run

    path = tpe_file(tmp_path, **{"sweep.n_trials": 4, "sweep.workers": 2, "sweep.seeds": [0]})
    assert run.main([str(path)]) == 0
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "journal.log")))
    [summary] = optuna.get_all_study_summaries(storage)
    ran = [t for t in optuna.load_study(study_name=summary.study_name, storage=storage).get_trials()
           if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(ran) >= 4
    params = [json.dumps(t.params, sort_keys=True) for t in ran]
    assert len(set(params)) == len(params), params
    run_dirs = [p.parent for p in Path(tmp_path / "runs").rglob("config.yaml")]
    assert len(run_dirs) == len(set(run_dirs)) == len(ran)  # one run directory per trial and seed
