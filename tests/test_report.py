"""core.report: claim verdicts (core.stats tests) on synthetic metric values, and the rendered report."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from core.errors import ConfigError
from core.report import FAILS, HOLDS, INCONCLUSIVE, Claim, check_paper, judge, judge_claim, parse_paper, pooled_std, render


def paper(claims, **kw):
    return parse_paper({"source": "test", "claims": claims, **kw})


def test_pooled_std_by_hand():
    # a: mean 2, sample var 1; b: mean 5, sample var 4 -> pooled var (2*1 + 2*4) / 4 = 2.5
    a, b = [1.0, 2.0, 3.0], [3.0, 5.0, 7.0]
    assert pooled_std(a, b) == pytest.approx(math.sqrt(2.5))
    assert math.isnan(pooled_std([1.0], a))


def test_better_claim_holds_fails_inconclusive():
    values = {"good": {"acc": [80.0, 81.0, 82.0]}, "bad": {"acc": [70.0, 71.0, 72.0]},
              "same": {"acc": [80.5, 81.5, 80.0]}, "one": {"acc": [90.0]}}
    p = paper([])
    assert judge(Claim(better="good", than="bad", metric="acc"), values, p)[0] == HOLDS
    verdict, m, detail = judge(Claim(better="bad", than="good", metric="acc"), values, p)
    assert verdict == FAILS and m == pytest.approx(-10.0)  # in the metric's units
    assert detail.startswith("Welch t, 3 seeds")  # lists: the seeds are unknown, so unpaired
    assert judge(Claim(better="good", than="same", metric="acc"), values, p)[0] == INCONCLUSIVE
    assert judge(Claim(better="one", than="bad", metric="acc"), values, p)[0] == INCONCLUSIVE  # one seed: no spread
    assert judge(Claim(better="good", than="missing", metric="acc"), values, p)[0] == INCONCLUSIVE


def test_better_claim_pairs_seeds():
    # a large seed-to-seed spread shared by both cells: unpaired it hides a steady +1 difference
    a, b = {0: 10.0, 1: 20.0, 2: 30.0}, {0: 9.0, 1: 19.1, 2: 28.9}
    p = paper([])
    res = judge_claim(Claim(better="a", than="b", metric="m"), {"a": {"m": a}, "b": {"m": b}}, p)
    assert (res.test, res.n, res.verdict) == ("paired t", 3, HOLDS)
    assert res.mean_diff == pytest.approx(1.0) and res.diffs == {"0": 1.0, "1": pytest.approx(0.9), "2": pytest.approx(1.1)}
    unpaired = judge_claim(Claim(better="a", than="b", metric="m"), {"a": {"m": list(a.values())}, "b": {"m": list(b.values())}}, p)
    assert (unpaired.test, unpaired.verdict) == ("Welch t", INCONCLUSIVE)
    assert unpaired.seeds_needed is not None and unpaired.seeds_needed > 3


def test_direction_lower_is_better_for_fd():
    values = {"a": {"fd_refnet": [1.0, 1.2, 1.1]}, "b": {"fd_refnet": [3.0, 3.2, 3.1]}}
    p = paper([])
    assert judge(Claim(better="a", than="b", metric="fd_refnet"), values, p)[0] == HOLDS
    assert judge(Claim(better="a", than="b", metric="fd_refnet", direction="higher"), values, p)[0] == FAILS
    assert judge(Claim(better="b", than="a", metric="fd_refnet"), values, paper([], metrics={"fd_refnet": "higher"}))[0] == HOLDS


def test_order_claim_needs_every_step():
    values = {"1": {"m": [1.0, 1.1, 0.9]}, "2": {"m": [2.0, 2.1, 1.9]}, "4": {"m": [3.0, 3.1, 2.9]},
              "8": {"m": [3.0, 3.2, 2.8]}}
    p = paper([])
    assert judge(Claim(order=["1", "2", "4"], metric="m"), values, p)[0] == HOLDS
    verdict, m, detail = judge(Claim(order=["1", "2", "4", "8"], metric="m"), values, p)
    assert verdict == INCONCLUSIVE and m == pytest.approx(0.0) and "8 vs 4" in detail and "Holm" in detail
    assert judge(Claim(order=["4", "2", "1"], metric="m"), values, p)[0] == FAILS


def test_matches_claim_tolerance():
    # Welch: difference -1, s.e. sqrt(2/3), 4 df -> 90% interval -1 -+ 2.132 * 0.8165 = [-2.74, 0.74]
    values = {"both": {"m": [50.0, 51.0, 52.0]}, "ctr": {"m": [51.0, 52.0, 53.0]}, "low": {"m": [40.0, 41.0, 42.0]}}
    p = paper([])
    verdict, m, detail = judge(Claim(matches="both", with_="ctr", metric="m", tolerance=3.0), values, p)
    assert verdict == HOLDS and m == pytest.approx(-1.0) and "TOST (Welch t)" in detail and "(90% CI)" in detail
    assert judge(Claim(matches="both", with_="ctr", metric="m", tolerance=0.5), values, p)[0] == INCONCLUSIVE
    # no tolerance: within x pooled std (here 1 x 1.0), and the detail says so
    verdict, _, detail = judge(Claim.model_validate({"matches": "low", "with": "ctr", "metric": "m"}), values, p)
    assert verdict == FAILS and "no tolerance declared: 1 pooled seed std = 1" in detail
    paired = {"both": {"m": {0: 50.0, 1: 51.0, 2: 52.0}}, "ctr": {"m": {0: 51.0, 1: 52.1, 2: 52.9}}}
    assert judge(Claim(matches="both", with_="ctr", metric="m", tolerance=1.5), paired, p)[0] == HOLDS
    assert judge(Claim(matches="both", with_="ctr", metric="m", tolerance=0.5), paired, p)[0] == FAILS


def test_claim_shape_errors_name_the_path():
    with pytest.raises(ConfigError, match=r"paper\.claims\.0: a claim is exactly one of"):
        parse_paper({"claims": [{"better": "a", "order": ["a", "b"], "metric": "m"}]})
    with pytest.raises(ConfigError, match=r"paper\.claims\.0\.metric: field required"):
        parse_paper({"claims": [{"better": "a", "than": "b"}]})
    with pytest.raises(ConfigError, match=r"paper\.claims\.0: no cell 'x'"):
        check_paper(paper([{"better": "x", "than": "a", "metric": "m"}]), ["a", "b"])
    with pytest.raises(ConfigError, match=r"paper\.figurs: unknown key"):
        parse_paper({"figurs": {}})


def test_render_puts_paper_figures_beside_ours_and_verdicts():
    p = paper([{"text": "a beats b", "better": "a", "than": "b", "metric": "acc"}],
              metrics={"acc": "higher"}, figures={"a": {"zero-shot": 46.1}, "b": {"zero-shot": 41.0}})
    values = {"a": {"acc": [80.0, 82.0]}, "b": {"acc": [70.0, 72.0]}}
    md, verdicts = render("t", p, values, ["b", "a"], [], {"wall_s": 120.0, "busy_s": 240.0, "runs": 4})
    rows = [line for line in md.splitlines() if line.startswith("| b |") or line.startswith("| a |")]
    # mean ± t(0.975, n - 1) s / sqrt(n): s = sqrt(2), n = 2 -> 12.706 (not the std, 1.41)
    assert rows == ["| b | 2 | 71.00 ± 12.71 | 41.0 |", "| a | 2 | 81.00 ± 12.71 | 46.1 |"]
    assert "## Results (mean over seeds ± half-width of its 95% confidence interval: Student t" in md
    assert "| a beats b | acc | **holds** | +10 | Welch t, 2 seeds: +10 [3.92, 16.1] (95% CI), p = 0.019 |" in md
    assert "wall time 2.0 min" in md
    assert verdicts[0][1] == HOLDS and verdicts[0][4].to_json()["verdict"] == HOLDS


def test_report_without_a_study_is_one_clear_error(tmp_path, monkeypatch, capsys):
    from core.report import main

    monkeypatch.chdir(tmp_path)
    exp = tmp_path / "e.yaml"
    exp.write_text((Path(__file__).resolve().parents[1] / "experiments" / "mcq_vs_rq.yaml").read_text())
    assert main([str(exp)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: sweep.storage: no study storage at") and len(err.splitlines()) == 1
    assert not (tmp_path / "optuna_journal.log").exists()


def test_render_accepts_seed_maps():
    p = paper([{"better": "a", "than": "b", "metric": "acc"}], metrics={"acc": "higher"})
    values = {"a": {"acc": {0: 80.0, 1: 82.0}}, "b": {"acc": {0: 70.0, 1: 72.5}}}
    md, verdicts = render("t", p, values, ["b", "a"], [], {"wall_s": 1.0, "busy_s": 1.0, "runs": 4})
    # means of values, not of seeds; b: s = 2.5 / sqrt(2), half-width 12.706 * 2.5 / 2 = 15.88
    assert "| b | 2 | 71.25 ± 15.88 |" in md and "| a | 2 | 81.00 ± 12.71 |" in md
    assert verdicts[0][4].test == "paired t" and verdicts[0][4].diffs == {"0": 10.0, "1": 9.5}


def test_results_table_and_json_give_each_cell_a_t_interval(tmp_path):
    """Per cell and metric: mean ± t_{n-1}(1 - alpha/2) s / sqrt(n), in the table and in reports/<name>.json."""
    import json

    from core.report import write_claims

    p = paper([{"better": "a", "than": "b", "metric": "acc"}], metrics={"acc": "higher"})
    # a: mean 2, s 1, n 3 -> 4.303 / sqrt(3) = 2.484; b: one seed, no interval
    values = {"a": {"acc": {0: 1.0, 1: 2.0, 2: 3.0}}, "b": {"acc": {0: 0.5}}}
    md, verdicts = render("t", p, values, ["a", "b"], [], {"wall_s": 1.0, "busy_s": 1.0, "runs": 4})
    assert "| a | 3 | 2.00 ± 2.48 |" in md and "| b | 1 | 0.500 |" in md
    md90, _ = render("t", paper([], metrics={"acc": "higher"}, alpha=0.1), values, ["a"], [], {"wall_s": 1.0, "busy_s": 1.0, "runs": 3})
    assert "its 90% confidence interval" in md90 and "| a | 3 | 2.00 ± 1.69 |" in md90  # t(0.95, 2) = 2.920 / sqrt(3)
    info = {"paper": p, "verdicts": verdicts, "values": values, "order": ["a", "b"], "study": "s", "seeds": {}}
    path, _ = write_claims(info, tmp_path, "t")
    doc = json.loads(path.read_text())
    assert {"experiment", "study", "source", "alpha", "seeds", "claims"} <= set(doc)  # the keys readers had
    a = doc["cells"]["a"]["acc"]
    assert (a["mean"], a["n"], a["ci_level"]) == (2.0, 3, 0.95)
    assert a["ci"] == pytest.approx([2.0 - 4.302653 / math.sqrt(3), 2.0 + 4.302653 / math.sqrt(3)])
    assert doc["cells"]["b"]["acc"] == {"mean": 0.5, "ci": [None, None], "ci_level": 0.95, "n": 1}


def test_inconclusive_claim_says_how_many_seeds_would_decide_it_in_markdown_and_json(tmp_path):
    import json

    from core import stats
    from core.report import write_claims

    # paired differences 1, -0.5, 2: a real-looking effect, too noisy for 3 seeds
    values = {"a": {"acc": {0: 11.0, 1: 9.5, 2: 12.0}}, "b": {"acc": {0: 10.0, 1: 10.0, 2: 10.0}}}
    p = paper([{"better": "a", "than": "b", "metric": "acc"}], metrics={"acc": "higher"})
    md, verdicts = render("t", p, values, ["a", "b"], [], {"wall_s": 1.0, "busy_s": 1.0, "runs": 6})
    res = verdicts[0][4]
    d = [1.0, -0.5, 2.0]
    need = stats.seeds_needed(sum(d) / 3, float(__import__("statistics").stdev(d)))
    assert res.verdict == INCONCLUSIVE and res.seeds_needed == need and 3 < need < 50
    assert f"about {need} seeds would decide it" in md
    path, _ = write_claims({"paper": p, "verdicts": verdicts, "values": values, "order": ["a", "b"]}, tmp_path, "t")
    assert json.loads(path.read_text())["claims"][0]["seeds_needed"] == need
