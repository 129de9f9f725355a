"""A study is its config: a changed config is another study (or refused by name), seeds and cells
can be added, a failure leaves nothing RUNNING or WAITING, bad storage is one error line, the report
finds the study from the same command line. Tests drive ``core.run`` / ``core.report`` as a user
does and read the storage with Optuna itself."""
from __future__ import annotations

import re
from pathlib import Path

import optuna
import pytest
from sweep_helpers import free_port, write_tiny

from core import report, run

TWO_CELLS = {"model.quantizer": {"vq16": {"type": "vq", "codebook_size": 16, "code_dim": 4},
                                 "mcq2x8": {"type": "mcq", "codes_per_token": 2, "codebook_size": 8, "code_dim": 2}}}


def tiny(tmp_path: Path, **changes) -> Path:
    return write_tiny(tmp_path, **{"sweep.space": TWO_CELLS, "train.steps": 2, "tracking.enabled": False, **changes})


def studies(tmp_path: Path) -> dict[str, list[optuna.trial.FrozenTrial]]:
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "journal.log")))
    return {s.study_name: optuna.load_study(study_name=s.study_name, storage=storage).get_trials(deepcopy=False)
            for s in optuna.get_all_study_summaries(storage)}


def states(tmp_path: Path) -> list[str]:
    return [t.state.name for ts in studies(tmp_path).values() for t in ts]


def test_changed_config_is_another_study_and_the_report_names_the_overrides(tmp_path, capsys):
    path = tiny(tmp_path, **{"train.steps": 3})  # the file: 3 steps, seeds 0 and 1
    assert run.main([str(path), "train.steps=2", "sweep.seeds=[0]"]) == 0
    first = capsys.readouterr().err
    assert run.main([str(path), "sweep.seeds=[0]"]) == 0
    second = capsys.readouterr().err
    name1 = re.search(r"study '([^']+)'", first).group(1)
    name2 = re.search(r"study '([^']+)'", second).group(1)
    assert name1 != name2 and "0 of 2 runs done or under way, 2 to run" in second  # not the 2-step results
    assert len(studies(tmp_path)) == 2

    out = tmp_path / "reports"
    assert report.main([str(path), "train.steps=2", "sweep.seeds=[0]", "--out", str(out), "--no-mlflow"]) == 0
    md = capsys.readouterr().out
    assert f"`{name1}`" in md and "`train.steps=2`" in md and "`sweep.seeds=[0]`" in md
    assert "Seeds per cell: vq16: 0; mcq2x8: 0." in md
    # the file as it is plans seeds 0 and 1: the report says which ones each cell has
    assert report.main([str(path), "--out", str(out), "--no-mlflow"]) == 0
    md = capsys.readouterr().out
    assert f"`{name2}`" in md and "the experiment file as it is" in md
    assert "Seeds per cell: vq16: 0 (missing 1); mcq2x8: 0 (missing 1)." in md
    # a config that never ran: one line naming the studies that did and how they differ
    assert report.main([str(path), "train.steps=4", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: sweep: no study")
    assert f"'{name1}' (train.steps: 4 -> 2)" in err and f"'{name2}' (train.steps: 4 -> 3)" in err


def test_a_named_study_refuses_another_config_naming_the_keys(tmp_path, capsys):
    path = tiny(tmp_path, **{"sweep.study_name": "mine", "sweep.seeds": [0]})
    assert run.main([str(path)]) == 0
    capsys.readouterr()
    assert run.main([str(path), "train.steps=3", "train.optimizer.lr=0.002"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: sweep.study_name: study 'mine'") and len(err.splitlines()) == 1
    assert "train.optimizer.lr: 0.001 -> 0.002" in err and "train.steps: 2 -> 3" in err and "sweep.study_name" in err
    assert [len(ts) for ts in studies(tmp_path).values()] == [2]  # nothing added


def test_seeds_and_cells_can_be_added_to_a_study(tmp_path, capsys):
    path = tiny(tmp_path)
    assert run.main([str(path), "sweep.seeds=[0]"]) == 0
    assert run.main([str(path), "sweep.seeds=[0,1]"]) == 0  # main: CategoricalDistribution ... dynamic value space
    assert "2 of 4 runs done or under way, 2 to run" in capsys.readouterr().err
    [trials] = studies(tmp_path).values()
    assert sorted(t.state.name for t in trials) == ["COMPLETE"] * 4
    assert run.main([str(path), "sweep.seeds=[0]"]) == 0  # the original command still works
    assert "1 of 1" not in capsys.readouterr().err
    three = {**TWO_CELLS["model.quantizer"], "rq": {"type": "rq", "codes_per_token": 2, "codebook_size": 8, "code_dim": 4}}
    tiny(tmp_path, **{"sweep.space": {"model.quantizer": three}})  # the file gains a cell
    assert run.main([str(path), "sweep.seeds=[0,1]"]) == 0
    assert "4 of 6 runs done or under way, 2 to run" in capsys.readouterr().err
    assert sorted(t.state.name for ts in studies(tmp_path).values() for t in ts) == ["COMPLETE"] * 6
    # the same cell name with another definition would mix results: refused, naming the key
    changed = {**three, "rq": {"type": "rq", "codes_per_token": 3, "codebook_size": 8, "code_dim": 4}}
    tiny(tmp_path, **{"sweep.space": {"model.quantizer": changed}})
    assert run.main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: sweep.space: cell 'rq' of study") and "model.quantizer.codes_per_token: 2 -> 3" in err


def test_a_crash_leaves_nothing_running_or_waiting(tmp_path, monkeypatch, capsys):
    import core.trainer

    path = tiny(tmp_path, **{"sweep.seeds": [0]})

    def crash(*a, **k):
        raise SystemExit("simulated crash inside a cell")

    monkeypatch.setattr(core.trainer, "train", crash)
    with pytest.raises(SystemExit):
        run.main([str(path)])
    assert states(tmp_path) and not {"RUNNING", "WAITING"} & set(states(tmp_path))
    monkeypatch.undo()
    assert run.main([str(path)]) == 0  # and the study is not wedged: the same command completes it
    [trials] = studies(tmp_path).values()
    assert sum(t.state.name == "COMPLETE" for t in trials) == 2


def test_report_hint_carries_the_overrides(tmp_path, capsys):
    path = tiny(tmp_path)
    assert run.main([str(path), "train.steps=2", "sweep.seeds=[0]"]) == 0
    err = capsys.readouterr().err
    assert f"Report: python -m core.report {path} train.steps=2 'sweep.seeds=[0]'" in err


# ------------------------------------------------------------------------------------------------
# bad storage: one line, exit 2, nothing left behind
# ------------------------------------------------------------------------------------------------


def _storage_cases(tmp_path: Path) -> dict[str, tuple[str, str]]:
    (tmp_path / "adir").mkdir()
    (tmp_path / "garbage.log").write_text("this is not a journal\n{also not\n")
    return {
        "directory": (str(tmp_path / "adir"), "is a directory"),
        "unknown_scheme": ("ftp://host/x", "unknown scheme 'ftp'"),
        "unreachable_postgres": (f"postgresql+psycopg2://u@127.0.0.1:{free_port()}/db", "cannot connect to postgresql+psycopg2://***@127.0.0.1"),
        "sqlite_missing_dir": (f"sqlite:///{tmp_path / 'no' / 'such' / 'x.db'}", "does not exist"),
        "garbage_journal": (str(tmp_path / "garbage.log"), "is not an Optuna journal (line 1"),
    }


@pytest.mark.parametrize("case", ["directory", "unknown_scheme", "unreachable_postgres", "sqlite_missing_dir", "garbage_journal"])
def test_bad_storage_is_one_error_line_and_leaves_nothing(tmp_path, capsys, case):
    url, expected = _storage_cases(tmp_path)[case]
    path = tiny(tmp_path, **{"tracking.enabled": True})
    before = sorted(p.name for p in tmp_path.iterdir())
    garbage = (tmp_path / "garbage.log").read_text()
    assert run.main([str(path), f"sweep.storage={url}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: sweep.storage: ") and expected in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no runs/, no mlflow.db, no journal
    assert (tmp_path / "garbage.log").read_text() == garbage
    assert report.main([str(path), f"sweep.storage={url}"]) == 2
    assert capsys.readouterr().err.startswith("error: sweep.storage: ")


def test_grid_too_large_to_list_is_refused_by_counting(tmp_path, capsys):
    space = {**TWO_CELLS, "train.optimizer.lr": {"low": 1.0e-4, "high": 1.0e-2, "step": 1.0e-12},
             "train.warmup": {"low": 0.0, "high": 0.5, "step": 1.0e-9}}  # 1e10 x 5e8 cells: listing them exhausts memory
    path = tiny(tmp_path, **{"sweep.space": space})
    assert run.main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: sweep.space: the grid has") and "more than 100,000 runs" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "journal.log").exists() and not (tmp_path / "runs").exists()


def test_cell_count_is_exact_with_conditions():
    from sweep_helpers import TINY

    from core.sweep import count_points, grid_points, parse_sweep

    sw = parse_sweep(TINY["sweep"])
    assert count_points(sw) == len(grid_points(sw)) == 4
    sw = parse_sweep({**TINY["sweep"], "space": {**TINY["sweep"]["space"], "train.optimizer.lr": {"low": 0.001, "high": 0.003, "step": 0.001}}})
    assert count_points(sw) == len(grid_points(sw)) == 12


# ------------------------------------------------------------------------------------------------
# claims and metrics are checked with the config, before training
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("paper, expected", [
    ({"claims": [{"better": "vq16", "than": "nope", "metric": "psnr"}]}, "paper.claims.0: no cell 'nope' in the sweep"),
    ({"claims": [{"better": "vq16", "than": "mcq2x8", "metric": "zero_shot_top1"}]},
     "paper.claims.0.metric: no evaluator in cell 'vq16' produces 'zero_shot_top1' (evaluators: psnr_ssim"),
    ({"metrics": {"fd_refnet": "lower"}}, "paper.metrics.fd_refnet: no evaluator in cell 'vq16' produces 'fd_refnet'"),
    ({"figures": {"vq17": {"rFID": 1.0}}}, "paper.figures.vq17: no cell 'vq17'"),
])
def test_claims_naming_missing_cells_or_metrics_fail_before_training(tmp_path, capsys, paper, expected):
    path = tiny(tmp_path, paper={"source": "test", **paper})
    assert run.main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {expected}"), err
    assert not (tmp_path / "journal.log").exists() and not (tmp_path / "runs").exists()


def test_objective_metric_no_evaluator_produces_fails_before_training(tmp_path, capsys):
    path = tiny(tmp_path, **{"sweep.objective.metric": "lpips_vgg"})
    assert run.main([str(path)]) == 2
    assert capsys.readouterr().err.startswith("error: sweep.objective.metric: no evaluator in cell 'vq16' produces 'lpips_vgg'")


def test_metric_names_follow_the_evaluators_declarations():
    from types import SimpleNamespace

    from core.plugins import get_registry
    from core.sweep.paper import check_metric

    reg = get_registry()
    cfgs = [reg.get("evaluators", t).Config.model_construct(type=t) for t in ("psnr_ssim", "lpips", "usage")]
    exp = SimpleNamespace(eval=cfgs)
    for ok in ("psnr", "ssim", "lpips_vgg", "usage_min", "bits_used", "usage_3", "skipped_steps"):
        check_metric("m", ok, exp, reg)
    for bad in ("psnrr", "lpips", "lpips_alex", "fd_refnet", "psnr_mean_image", "usage_"):
        with pytest.raises(Exception, match="no evaluator produces"):
            check_metric("m", bad, exp, reg)


# ------------------------------------------------------------------------------------------------
# the Optuna calls the study module relies on
# ------------------------------------------------------------------------------------------------


def test_optuna_version_is_supported_and_its_private_calls_behave(tmp_path):
    from core.sweep import study as st
    from core.sweep.record import TrialRecord
    from core.sweep.space import Cell

    version = tuple(int(x) for x in optuna.__version__.split(".")[:2])
    assert st.SUPPORTED_OPTUNA[0] <= version < st.SUPPORTED_OPTUNA[1], optuna.__version__
    storage = st.make_storage(str(tmp_path / "j.log"))
    a = optuna.create_study(study_name="s", storage=storage)
    b = optuna.load_study(study_name="s", storage=st.make_storage(str(tmp_path / "j.log")))
    cells = [Cell(choices={"k": "x"}, seed=s) for s in (0, 1, 2)]
    assert st.enqueue_missing(a, cells) == 3 and st.enqueue_missing(b, cells) == 0
    got = [st.claim(a), st.claim(b)]
    assert [st.fresh_record(a, t).key for t in got] == ["x#seed=0", "x#seed=1"]  # WAITING -> RUNNING for one worker each
    assert st.drop_waiting(a, set(), "test") == 1 and st.claim(b) is None  # WAITING -> FAIL
    st.save_record(got[0], TrialRecord(key="x#seed=0", metrics={0: {"m": 1.5}}))
    st.tell(a, got[0], "COMPLETE", 1.5)
    views = {v.number: v for v in st.read_trials(b)}
    assert views[0].state == "COMPLETE" and views[0].record.metrics == {0: {"m": 1.5}} and views[2].record.not_run == "test"
    assert st.duplicate_of(a, got[1], "x#seed=0") == 0
    st.set_attr(a, "k", 1)
    assert st.get_attr(b, "k") == 1


def test_a_command_that_reads_the_study_while_another_creates_it_joins_it(tmp_path, monkeypatch):
    """Two commands starting together (workers on several machines, one PostgreSQL study): B reads
    the new study's attributes before A records its identity, and its trial list after A has begun.
    B must join the study, not call it "made by an older vtok" (a flaky failure of the two-worker
    PostgreSQL test under load)."""
    from sweep_helpers import load

    from core.sweep import study as st

    _, exp = load(tiny(tmp_path))
    a = st.open_study(exp, exp.sweep)  # command A: creates the study, records the identity ...
    a.ask()  # ... and begins its first trial
    real = optuna.Study.user_attrs.fget
    reads = []

    def stale_first_read(self):  # B's first read happened before A recorded the identity
        reads.append(1)
        return {} if len(reads) == 1 else real(self)

    monkeypatch.setattr(optuna.Study, "user_attrs", property(stale_first_read))
    b = st.open_study(exp, exp.sweep)
    assert b.study_name == a.study_name and len(reads) >= 2
    assert real(b)[st.IDENTITY] == st.identity(exp)
