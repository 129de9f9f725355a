"""Seeds until decided (core.sweep.adaptive): a grid sweep with ``seeds: {min, max}`` adds seeds to
the pairs of cells an open claim compares, same seed in both, until the claim is decided or max.
The cell runs are replaced by known per-seed values (the planner is under test, not training)."""
from __future__ import annotations

import collections

import pytest

from core.sweep import workers
from sweep_helpers import keys, load, run_sweep, trials, write_tiny

SPACE = {"model.quantizer": {
    "vq16": {"type": "vq", "codebook_size": 16, "code_dim": 4},
    "mcq2x8": {"type": "mcq", "codes_per_token": 2, "codebook_size": 8, "code_dim": 2},
    "rq": {"type": "rq", "codes_per_token": 2, "codebook_size": 8, "code_dim": 4},
}}
CLAIMS = [
    {"better": "vq16", "than": "mcq2x8", "metric": "psnr"},  # +10 dB, spread 0.1: decided at min
    {"better": "rq", "than": "vq16", "metric": "psnr"},  # differences +-2 alternating: never decided
]


def value(cell: str, seed: int) -> float:
    base = 30.0 + 0.5 * seed  # shared by every cell at seed s (the paired design)
    return base + {"vq16": 0.0, "mcq2x8": -10.0 + 0.1 * (seed % 3), "rq": 2.0 * (-1) ** seed}[cell]


def write(d, **changes):
    return write_tiny(d, **{"sweep.space": SPACE, "sweep.seeds": {"min": 3, "max": 6}, "tracking.enabled": False,
                            "paper.claims": CLAIMS, **changes})


@pytest.fixture
def fake_runs(monkeypatch):
    calls: list[str] = []
    stop_at: list[str] = []

    def run_cell(exp, choices, seed, trial, rec, parent_id, on_eval=None):
        key = f"{rec.cell}#seed={seed}"
        if key in stop_at:
            raise KeyboardInterrupt  # the command is killed while this cell runs
        calls.append(key)
        return {"psnr": value(rec.cell, seed)}

    monkeypatch.setattr(workers, "run_cell", run_cell)
    return calls, stop_at


def _complete(path):
    done = keys(trials(path))
    assert len(done) == len(set(done))  # never a (cell, seed) twice
    return collections.defaultdict(set, {c: {int(k.split("=")[1]) for k in done if k.startswith(c + "#")}
                                         for c in ("vq16", "mcq2x8", "rq")})


def test_decided_claim_stops_at_min_open_claim_goes_to_max(tmp_path, fake_runs):
    calls, _ = fake_runs
    path = write(tmp_path)
    assert run_sweep(path) == 0
    got = _complete(path)
    assert got["mcq2x8"] == {0, 1, 2}  # its only claim was decided at the minimum
    assert got["vq16"] == got["rq"] == set(range(6))  # the open claim took both cells to max, same seeds
    assert len(calls) == len(set(calls)) == 3 + 6 + 6
    # the seed range is not part of the study's identity: a plain list names the same study
    _, exp_range = load(path)
    _, exp_list = load(path, "sweep.seeds=[0,1,2]")
    from core.sweep import study_name
    assert study_name(exp_range, exp_range.sweep) == study_name(exp_list, exp_list.sweep)


def test_budget_spent_stops_adding(tmp_path, fake_runs):
    path = write(tmp_path, **{"sweep.seeds": {"min": 3, "max": 6, "budget_minutes": 1e-9}})
    assert run_sweep(path) == 0
    got = _complete(path)
    assert got["vq16"] == got["rq"] == got["mcq2x8"] == {0, 1, 2}


def test_killed_then_rerun_continues_without_repeating(tmp_path, fake_runs):
    calls, stop_at = fake_runs
    path = write(tmp_path)
    stop_at.append("rq#seed=4")
    assert run_sweep(path) == 130
    first = list(calls)
    assert "vq16#seed=3" in first and "rq#seed=4" not in first
    stop_at.clear()
    calls.clear()
    assert run_sweep(path) == 0
    assert not set(first) & set(calls)  # nothing that completed ran again
    got = _complete(path)
    assert got["mcq2x8"] == {0, 1, 2} and got["vq16"] == got["rq"] == set(range(6))


def test_seed_range_config():
    from core.errors import ConfigError
    from core.sweep.space import parse_sweep

    sw = parse_sweep({"space": SPACE, "seeds": {"min": 2, "max": 4}, "objective": {"metric": "psnr"}})
    assert sw.seeds == [0, 1] and sw.seed_range.max == 4
    from core.sweep.space import pool
    assert {c.seed for c in pool(sw)} == {0, 1, 2, 3}
    for bad, where in (({"min": 5, "max": 4}, "seeds: max"), ({"min": 1, "max": 4}, "seeds.min"),
                       ({"min": 2, "max": 4, "budget_minutes": 0}, "seeds.budget_minutes")):
        with pytest.raises(ConfigError, match=where):
            parse_sweep({"space": SPACE, "seeds": bad, "objective": {"metric": "psnr"}})
    with pytest.raises(ConfigError, match="sampler grid"):
        parse_sweep({"space": {"train.optimizer.lr": {"low": 1e-4, "high": 1e-2}}, "sampler": "tpe", "n_trials": 2,
                     "seeds": {"min": 2, "max": 4}, "objective": {"metric": "psnr"}})


def test_seed_range_is_one_error_line_where_it_cannot_work(tmp_path, capsys):
    """A seed range without claims to decide (or with TPE): one line at sweep.seeds, exit 2, nothing written."""
    from core.run import main

    path = write(tmp_path, **{"paper.claims": []})
    for args in ([str(path)], [str(path), "--dry-run"]):
        assert main(args) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("error: sweep.seeds: a seed range {min, max} adds seeds until"), err
    path = write(tmp_path, **{"paper.claims": [], "sweep.space": {"train.optimizer.lr": {"low": 1e-4, "high": 1e-2}},
                              "sweep.sampler": "tpe", "sweep.n_trials": 2})
    assert main([str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "needs sampler grid" in err[0], err
    assert not (tmp_path / "journal.log").exists() and not (tmp_path / "runs").exists()


REAL_SPACE = {"train.optimizer.lr": {"choices": {"fast": 3e-2, "still": 1e-9}},
              # a logging option changes nothing: with the paired design both cells give equal metrics
              "train.log_every": {"choices": {"l1": 1, "l2": 2}, "when": {"train.optimizer.lr": "still"}}}
REAL_CLAIMS = [{"better": "fast", "than": "still/l1", "metric": "psnr"},  # ~4 dB, decided at 3 seeds
               {"better": "still/l2", "than": "still/l1", "metric": "psnr"}]  # differences all 0: to max


def write_real(d, **changes):
    return write_tiny(d, **{"sweep.space": REAL_SPACE, "sweep.seeds": {"min": 3, "max": 4}, "tracking.enabled": False,
                            "train.steps": 4, "paper.claims": REAL_CLAIMS, **changes})


def check_real(path):
    views = trials(path)
    got = _complete(path)
    for c in ("fast", "still/l1", "still/l2"):
        got[c] = {int(k.split("=")[1]) for k in keys(views) if k.startswith(c + "#")}
    assert got["fast"] == {0, 1, 2} and got["still/l1"] == got["still/l2"] == {0, 1, 2, 3}, got
    psnr = {t.record.key: t.record.metrics[t.record.seeds[0]]["psnr"] for t in views if t.state == "COMPLETE"}
    assert all(psnr[f"still/l1#seed={s}"] == psnr[f"still/l2#seed={s}"] for s in range(4))  # paired: same seed, same run
    assert len({psnr[f"still/l1#seed={s}"] for s in range(4)}) == 4  # seeds differ


def test_real_tiny_adaptive_sweep(tmp_path):
    """Real training (4 steps): the big effect is decided at the minimum, the null claim runs to max."""
    path = write_real(tmp_path)
    assert run_sweep(path) == 0
    check_real(path)
    assert run_sweep(path) == 0  # re-running a finished adaptive sweep runs nothing
    assert len(keys(trials(path))) == 3 + 4 + 4


def test_report_json_and_claim_plots_on_the_parent_run(tmp_path, fake_runs):
    """The end of the sweep writes ``reports/<name>.json`` (every claim's verdict, from
    ClaimResult.to_json) and a plot per claim, and attaches them to the parent MLflow run."""
    import json

    path = write(tmp_path, **{"tracking.enabled": True, "sweep.seeds": {"min": 3, "max": 4}})
    assert run_sweep(path) == 0
    out = tmp_path / "reports"
    doc = json.loads((out / "tiny_sweep.json").read_text())
    assert doc["experiment"] == "tiny_sweep" and doc["study"].startswith("tiny_sweep-")
    c0, c1 = doc["claims"]
    assert (c0["verdict"], c0["n"], c0["cells"]) == ("holds", 3, ["vq16", "mcq2x8"])
    assert {int(s): d for s, d in c0["diffs"].items()} == pytest.approx({s: value("vq16", s) - value("mcq2x8", s) for s in range(3)})
    assert c0["mean_diff"] == pytest.approx(10 - 0.1)  # 10 - mean(0, 0.1, 0.2)
    assert c0["ci"][0] > 0 and c0["text"] == "vq16 better than mcq2x8"
    assert (c1["verdict"], c1["n"]) == ("inconclusive", 4)
    assert {int(s): d for s, d in c1["diffs"].items()} == pytest.approx({s: 2.0 * (-1) ** s for s in range(4)})
    # per cell and metric: mean, t-interval and n over the seeds the cell ran (3, or 4 where a claim stayed open)
    vq = doc["cells"]["vq16"]["psnr"]
    assert vq["n"] == 4 and vq["mean"] == pytest.approx(sum(value("vq16", s) for s in range(4)) / 4)
    assert vq["ci"][0] < vq["mean"] < vq["ci"][1] and doc["cells"]["mcq2x8"]["psnr"]["n"] == 3
    md = (out / "tiny_sweep.md").read_text()
    assert "seeds 3 to 4 per cell until the claims are decided" in md and "not in sweep.seeds" not in md
    assert "Seeds per cell: vq16: 0, 1, 2, 3; mcq2x8: 0, 1, 2; rq: 0, 1, 2, 3." in md
    for i in (0, 1):
        assert (out / f"tiny_sweep.claim{i}.png").stat().st_size > 1000
    from mlflow.tracking import MlflowClient

    from core.tracking import resolve_uri
    _, exp = load(path)
    from core.sweep import study as st
    parent = st.open_study(exp, exp.sweep, create=False).user_attrs[st.PARENT_RUN]
    client = MlflowClient(tracking_uri=resolve_uri(exp.tracking.uri))
    names = {a.path for a in client.list_artifacts(parent, "report")}
    assert {"report/tiny_sweep.json", "report/tiny_sweep.claim0.png", "report/tiny_sweep.claim1.png",
            "report/tiny_sweep.md"} <= names


def test_claim_plot_order_claim_has_a_panel_per_pair(tmp_path):
    import matplotlib.image

    from core import stats
    from core.report_plots import claim_plot

    vals = [{s: 1.0 * k + 0.1 * s * k for s in range(4)} for k in range(3)]
    res = stats.order(vals, cells=["a", "b", "c"], statement="a < b < c", metric="psnr")
    assert len(res.pairs) == 2
    one = claim_plot(res.pairs[0], tmp_path / "one.png")
    two = claim_plot(res, tmp_path / "two.png")
    w1, w2 = matplotlib.image.imread(one).shape[1], matplotlib.image.imread(two).shape[1]
    assert w2 == pytest.approx(2 * w1, rel=0.02)  # two panels, each as wide as a single claim's


@pytest.fixture
def timed_runs(monkeypatch):
    """Cell runs that take one minute of a fake clock each (a killed one half a minute)."""
    from core.sweep import adaptive

    now = [1000.0]
    calls: list[str] = []
    stop_at: list[str] = []

    def run_cell(exp, choices, seed, trial, rec, parent_id, on_eval=None):
        key = f"{rec.cell}#seed={seed}"
        if key in stop_at:
            now[0] += 30.0
            raise KeyboardInterrupt
        now[0] += 60.0
        calls.append(key)
        return {"psnr": value(rec.cell, seed)}

    monkeypatch.setattr(workers, "run_cell", run_cell)
    monkeypatch.setattr(adaptive, "clock", lambda: now[0])
    return calls, stop_at


def test_budget_counts_the_time_of_earlier_killed_commands(tmp_path, timed_runs, capsys):
    """budget 10 min, 1 min per run: 9 runs at the minimum, one round of 2 seeds, then spent. Killed
    during that round and re-run, the second command starts from the first one's 9.5 min (recorded in
    the study) and stops after finishing the round; counting only its own 2 min it would go to max."""
    from core.sweep import adaptive
    from core.sweep import study as st

    calls, stop_at = timed_runs
    path = write(tmp_path, **{"sweep.seeds": {"min": 3, "max": 6, "budget_minutes": 10}})
    stop_at.append("rq#seed=3")
    assert run_sweep(path) == 130
    assert len(calls) == 9 and "rq#seed=3" not in calls
    _, exp = load(path)
    study = st.open_study(exp, exp.sweep, create=False)
    assert adaptive.spent_seconds(study) == pytest.approx(9 * 60 + 30)
    stop_at.clear()
    calls.clear()
    capsys.readouterr()
    assert run_sweep(path) == 0
    err = capsys.readouterr().err
    assert "seed budget: 9.5 of 10 min spent by earlier commands" in err
    assert "the seed budget of 10 min is spent (11.5 min over this study's commands)" in err
    assert sorted(calls) == ["rq#seed=3", "vq16#seed=3"]  # the killed round finished, nothing added
    got = _complete(path)
    assert got["vq16"] == got["rq"] == {0, 1, 2, 3} and got["mcq2x8"] == {0, 1, 2}
    assert adaptive.spent_seconds(study) == pytest.approx(11.5 * 60)
    calls.clear()
    assert run_sweep(path) == 0 and calls == []  # spent: a third command adds nothing


def test_one_progress_display_for_the_whole_adaptive_sweep(tmp_path, fake_runs, monkeypatch, capsys):
    """Rounds that add seeds grow the total of the one display; its count never restarts."""
    import re

    from core import progress

    made = []

    class Recorded(progress.SweepProgress):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(progress, "SweepProgress", Recorded)
    path = write(tmp_path)
    assert run_sweep(path) == 0
    err = capsys.readouterr().err
    assert len(made) == 1 and made[0].done == made[0].total == 3 + 6 + 6
    counts = [(int(a), int(b)) for a, b in re.findall(r"^\[\s*(\d+)/(\d+)\] ", err, re.M)]
    assert [a for a, _ in counts] == list(range(1, 16))
    totals = [b for _, b in counts]
    assert totals[0] == 9 and totals == sorted(totals) and totals[-1] == 15  # 9, then +2 per added seed
    assert err.count("claims still open: 2 more runs") == 3
    # the planner's line comes after the round's runs landed
    lines = err.splitlines()
    first_open = next(i for i, line in enumerate(lines) if "claims still open" in line)
    assert sum(1 for line in lines[:first_open] if re.match(r"^\[\s*\d+/\d+\] ", line)) == 9
