"""core.stats: reference values (hand, scipy, published boundaries) and simulated adaptive sweeps.

The simulation figures quoted in the README come from
    python -m pytest tests/test_stats.py -q -s -k simulated
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as st

from core import stats as S

DESIGN = S.Design(min_seeds=3, max_seeds=12)  # the adaptive sweep: 3 seeds, then one more per look, up to 12
SIMS = 4000


# ------------------------------------------------------------------------------------------------
# fixed-sample tests against hand-computed and scipy values
# ------------------------------------------------------------------------------------------------


def test_paired_t_interval_and_p_by_hand():
    # d = [1, 0.5, 2.5]: mean 4/3, sd sqrt(13/12), se sd / sqrt 3, t = 2.21880; with 2 df the t
    # distribution has closed forms: two-sided p = 1 - t / sqrt(t^2 + 2) and t_{0.975} = sqrt(1.805 / 0.0975)
    a, b = {0: 80.0, 1: 81.0, 2: 82.5}, {0: 79.0, 1: 80.5, 2: 80.0}
    res = S.better(a, b)
    se = math.sqrt(13 / 12) / math.sqrt(3)
    t = (4 / 3) / se
    q = math.sqrt(1.805 / 0.0975)
    assert (res.test, res.n) == ("paired t", 3)
    assert res.mean_diff == pytest.approx(4 / 3)
    assert res.p == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-9)
    assert res.ci == pytest.approx((4 / 3 - q * se, 4 / 3 + q * se), rel=1e-9)
    ref = st.ttest_rel([80.0, 81.0, 82.5], [79.0, 80.5, 80.0])
    assert res.p == pytest.approx(ref.pvalue) and res.ci == pytest.approx(tuple(ref.confidence_interval()))
    assert res.verdict == S.INCONCLUSIVE
    assert res.diffs == {"0": 1.0, "1": 0.5, "2": 2.5}


def test_pairs_only_shared_seeds_and_orders_by_seed_not_position():
    a = {2: 5.0, 0: 1.0, 1: 3.0, 7: 100.0}  # seed 7 has no partner
    b = {0: 0.0, 1: 2.5, 2: 3.5, 9: -50.0}
    e = S.estimate(a, b)
    assert e.test == "paired t" and e.n == 3
    assert e.diffs == {"2": 1.5, "0": 1.0, "1": 0.5} and e.mean == pytest.approx(1.0)


def test_welch_against_scipy():
    a, b = [80.0, 81.0, 82.5, 79.5], [79.0, 80.5, 80.0]
    res = S.better(a, b)
    ref = st.ttest_ind(a, b, equal_var=False)
    assert res.test == "Welch t" and res.n == 3
    assert res.p == pytest.approx(ref.pvalue, rel=1e-9)
    assert res.ci == pytest.approx(tuple(ref.confidence_interval()), rel=1e-9)
    assert S.estimate(a, b).df == pytest.approx(ref.df)
    # seed maps that share fewer than two seeds fall back to Welch as well
    assert S.estimate({0: 1.0, 1: 2.0}, {1: 1.5, 5: 2.5}).test == "Welch t"


def test_better_verdict_follows_interval_side_and_direction():
    a, b = {s: 10.0 + s for s in range(4)}, {s: 9.0 + s + 0.1 * (-1) ** s for s in range(4)}
    assert S.better(a, b).verdict == S.HOLDS
    assert S.better(b, a).verdict == S.FAILS
    assert S.better(a, b, higher_is_better=False).verdict == S.FAILS  # e.g. FD: a larger is worse
    assert S.better(b, a, higher_is_better=False).verdict == S.HOLDS
    # p < alpha exactly when the interval excludes 0
    for x, y in ((a, b), ({0: 1.0, 1: 2.0, 2: 0.0}, {0: 0.5, 1: 1.0, 2: 0.4})):
        r = S.better(x, y)
        assert (r.p < S.ALPHA) == (r.ci[0] > 0 or r.ci[1] < 0)


def test_too_few_seeds_is_inconclusive_with_a_reason():
    r = S.better({0: 1.0}, {0: 0.0, 1: 1.0})
    assert r.verdict == S.INCONCLUSIVE and r.test == "" and "needs 2 seeds per cell (a: 1, b: 2)" in r.detail()
    assert S.better([], [1.0, 2.0]).verdict == S.INCONCLUSIVE


def test_tost_against_two_one_sided_scipy_tests():
    a = {0: 50.0, 1: 51.0, 2: 52.0, 3: 50.5}
    b = {0: 50.2, 1: 51.5, 2: 51.8, 3: 50.9}
    d = np.array([a[s] - b[s] for s in a])
    for tol in (0.3, 0.8, 2.0):
        res = S.matches(a, b, tol)
        p_lo = st.ttest_1samp(d, -tol, alternative="greater").pvalue
        p_hi = st.ttest_1samp(d, tol, alternative="less").pvalue
        assert res.p == pytest.approx(max(p_lo, p_hi), rel=1e-9)
        assert res.ci_level == pytest.approx(0.90)
        assert res.ci == pytest.approx(tuple(st.ttest_1samp(d, 0).confidence_interval(0.90)), rel=1e-9)
        assert (res.verdict == S.HOLDS) == (max(p_lo, p_hi) < 0.05)
    assert S.matches(a, b, 2.0).verdict == S.HOLDS
    assert S.matches(a, b, 0.3).verdict == S.INCONCLUSIVE
    far = {s: v - 5.0 for s, v in b.items()}
    res = S.matches(a, far, 1.0)
    assert res.verdict == S.FAILS and res.ci[0] > 1.0  # the whole 90% interval beyond +tolerance


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert S.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert S.holm([0.2, 0.9]) == pytest.approx([0.4, 0.9]) and S.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert S.holm([0.01, math.nan]) == pytest.approx([0.02, 1.0])


def test_order_claim_uses_holm_over_neighbour_pairs():
    rng = np.random.default_rng(3)
    noise = rng.normal(0, 0.1, size=(3, 5))
    cells = [{s: level + noise[i, s] for s in range(5)} for i, level in enumerate((1.0, 2.0, 3.0))]
    res = S.order(cells, cells=["x", "y", "z"])
    raw = [S.better(cells[i + 1], cells[i]).p for i in range(2)]
    assert [pr.p for pr in res.pairs] == pytest.approx(S.holm(raw))
    assert res.verdict == S.HOLDS and res.test == "Holm over paired t"
    assert [pr.cells for pr in res.pairs] == [["y", "x"], ["z", "y"]]
    assert S.order(cells[::-1], cells=["z", "y", "x"]).verdict == S.FAILS
    # two pairs that pass alone (p about 0.04) but not after Holm (smaller p times 2) keep the claim open
    flat = [{0: 9.4, 1: 9.7, 2: 9.6}, {0: 10.0, 1: 10.1, 2: 9.9}, {0: 10.6, 1: 10.4, 2: 10.5}]
    r = S.order(flat, cells=["a", "b", "c"])
    alone = [S.better(flat[i + 1], flat[i]).p for i in range(2)]
    assert all(0.025 < p < 0.05 for p in alone)
    assert [pr.p for pr in r.pairs] == pytest.approx([2 * min(alone)] * 2)
    assert [pr.verdict for pr in r.pairs] == [S.INCONCLUSIVE] * 2 and r.verdict == S.INCONCLUSIVE
    assert r.seeds_needed is not None and r.seeds_needed > 3


def test_seeds_needed_matches_published_power_tables():
    # one-sample / paired t, two-sided alpha 0.05, power 0.8 (G*Power: d = 0.2 -> 199, 0.5 -> 34, 0.8 -> 15, 1 -> 10)
    assert [S.seeds_needed(d, 1.0) for d in (0.2, 0.5, 0.8, 1.0)] == [199, 34, 15, 10]
    assert S.seeds_needed(-2.0, 4.0) == 34  # scale-free, either sign
    assert S.seeds_needed(0.0, 1.0) is None and S.seeds_needed(1.0, 0.0) is None
    assert S.seeds_needed(1e-3, 1.0) is None  # beyond MAX_SEEDS_NEEDED


def test_seeds_needed_power_is_reached_by_simulation():
    # the returned n reaches 80% power for the fixed-sample TOST (true difference 0.2, sd 1, tolerance 0.8)
    n = S.seeds_needed(0.2, 1.0, margin=0.8)
    rng = np.random.default_rng(5)

    def tost_power(k: int) -> float:
        d = 0.2 + rng.standard_normal((20000, k))
        m, se = d.mean(1), d.std(1, ddof=1) / math.sqrt(k)
        tc = st.t.isf(0.05, k - 1)
        return float(np.mean(((m + 0.8) / se >= tc) & ((m - 0.8) / se <= -tc)))

    assert tost_power(n) >= 0.79 and tost_power(n - 3) < 0.8  # the bound P(A) + P(B) - 1 is slightly conservative


def test_claim_result_is_json():
    res = S.order([{0: 1.0, 1: 2.0}, {0: 1.5, 1: 1.0}], cells=["a", "b"], statement="b > a", metric="m")
    out = json.loads(json.dumps(res.to_json(), allow_nan=False))
    assert out["kind"] == "order" and out["pairs"][0]["cells"] == ["b", "a"] and out["statement"] == "b > a"
    missing = json.loads(json.dumps(S.better([], []).to_json(), allow_nan=False))
    assert missing["mean_diff"] is None and missing["ci"] == [None, None] and missing["p"] is None


# ------------------------------------------------------------------------------------------------
# group-sequential boundaries
# ------------------------------------------------------------------------------------------------


def test_boundaries_match_published_lan_demets_values():
    # five equally spaced looks, two-sided alpha 0.05 (Reboussin, DeMets, Kim & Lan's ld98; gsDesign sfLDOF / sfLDPocock)
    fracs = tuple(k / 5 for k in range(1, 6))
    assert S.z_boundaries(fracs, 0.05, "obf") == pytest.approx((4.8769, 3.3569, 2.6803, 2.2898, 2.0310), abs=2e-4)
    assert S.z_boundaries(fracs, 0.05, "pocock") == pytest.approx((2.4380, 2.4268, 2.4102, 2.3966, 2.3860), abs=2e-4)
    assert S.z_boundaries((1.0,), 0.05, "obf")[0] == pytest.approx(st.norm.isf(0.025))  # one look: the fixed test


@pytest.mark.parametrize("spending", ["obf", "pocock"])
def test_boundaries_spend_alpha_as_planned_brute_force(spending):
    # Brownian motion at the design's looks: the simulated first-crossing probability up to each look
    # equals the spending function there
    fracs = tuple(n / 12 for n in range(3, 13))
    c = np.array(S.z_boundaries(fracs, 0.05, spending))
    rng = np.random.default_rng(11)
    t = np.array(fracs)
    steps = rng.standard_normal((400_000, len(t))) * np.sqrt(np.diff(t, prepend=0.0))
    z = np.cumsum(steps, axis=1) / np.sqrt(t)
    crossed = np.maximum.accumulate(np.abs(z) >= c, axis=1).mean(axis=0)
    planned = np.array([S.spent(x, 0.05, spending) for x in t])
    assert crossed == pytest.approx(planned, abs=1.5e-3)


def test_design_helpers():
    assert S.design_for({"min": 3, "max": 12}) == S.Design(3, 12)
    assert S.design_for([0, 1, 2]) is None
    assert S.Design(3, 12).looks(5) == (3, 4, 5) and S.Design(3, 12).looks(20)[-1] == 12
    with pytest.raises(ValueError):
        S.Design(5, 3)
    # a design with a single look at its maximum is the fixed-sample test, uncalibrated
    one = S.Design(6, 6)
    assert S.critical_t(6, 5, one) == pytest.approx(S.critical_t(6, 5, None), rel=1e-6)
    r_fixed = S.better({s: s * 0.7 % 1 for s in range(6)}, {s: 0.2 for s in range(6)})
    r_one = S.better({s: s * 0.7 % 1 for s in range(6)}, {s: 0.2 for s in range(6)}, design=one)
    assert r_one.ci == pytest.approx(r_fixed.ci, rel=1e-6) and r_one.p == pytest.approx(r_fixed.p, rel=1e-3)


def test_spending_is_chosen_in_the_seed_range_config():
    from core.sweep.space import parse_sweep

    sw = parse_sweep({"sampler": "grid", "seeds": {"min": 3, "max": 10, "spending": "pocock"},
                      "space": {"train.steps": [1, 2]}, "objective": {"metric": "psnr"}})
    assert S.design_for(sw.seed_range) == S.Design(3, 10, "pocock")
    assert S.design_for({"min": 3, "max": 10}).spending == "obf"  # the default
    # a large effect over 3 seeds (diffs 10, 11, 12: t = 19): O'Brien-Fleming spends almost nothing
    # at the first look (critical t 131), Pocock decides it (critical t 7.4)
    a, b = {0: 10.0, 1: 11.0, 2: 12.0}, {0: 0.0, 1: 0.0, 2: 0.0}
    assert S.better(a, b, design=S.Design(3, 10, "obf")).verdict == S.INCONCLUSIVE
    assert S.better(a, b, design=S.Design(3, 10, "pocock")).verdict == S.HOLDS
    with pytest.raises(Exception, match="spending"):
        parse_sweep({"sampler": "grid", "seeds": {"min": 3, "max": 10, "spending": "haybittle"},
                     "space": {"train.steps": [1, 2]}, "objective": {"metric": "psnr"}})


def test_sequential_intervals_are_wider_early_and_p_agrees_with_the_verdict():
    a = {s: 1.0 + 0.5 * math.sin(s) for s in range(6)}
    b = {s: 0.0 for s in range(6)}
    fixed, seq = S.better(a, b), S.better(a, b, design=DESIGN)
    assert seq.ci[0] < fixed.ci[0] and seq.ci[1] > fixed.ci[1] and seq.p > fixed.p
    assert "repeated CI" in seq.detail() and seq.design.startswith("O'Brien-Fleming")
    for n in range(3, 7):
        r = S.better({s: a[s] for s in range(n)}, {s: 0.0 for s in range(n)}, design=DESIGN)
        assert (r.verdict == S.HOLDS) == (r.p < 0.05)
        assert r.verdict == {S.HOLDS: S.HOLDS, S.FAILS: S.FAILS}.get(S.decide([a[s] for s in range(n)], design=DESIGN),
                                                                      S.INCONCLUSIVE)
    assert S.better({0: 1.0, 1: 2.0}, {0: 0.0, 1: 0.0}, design=DESIGN).note == "no verdict before 3 seeds"


def test_decide_states():
    assert S.decide([1.0, 2.0], design=DESIGN) == S.CONTINUE
    assert S.decide([0.3, -0.2, 0.1], design=DESIGN) == S.CONTINUE
    assert S.decide([0.3, -0.2, 0.1] * 4, design=DESIGN) == S.AT_MAX
    assert S.decide([1.0, 1.1, 0.9, 1.05, 0.95], design=DESIGN) == S.HOLDS
    assert S.decide([-1.0, -1.1, -0.9, -1.05, -0.95], design=DESIGN) == S.FAILS
    assert S.decide([1.0, 1.1, 0.9, 1.05, 0.95], looks=[3, 5], design=DESIGN) == S.HOLDS
    with pytest.raises(ValueError):
        S.decide([1.0, 1.1, 0.9], looks=[3, 4], design=DESIGN)


# ------------------------------------------------------------------------------------------------
# simulated adaptive sweeps
# ------------------------------------------------------------------------------------------------


def simulate(diffs: np.ndarray, design: S.Design, crit: dict[int, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Adaptive sweeps on rows of per-seed differences (positive favours the claim): judge after every
    seed from min_seeds on, stop at the first verdict. Returns (+1 holds / -1 does not hold / 0
    inconclusive at max, seeds used)."""
    crit = crit or S.critical_values(design)
    verdict = np.zeros(len(diffs), dtype=int)
    used = np.full(len(diffs), design.max_seeds)
    running = np.ones(len(diffs), dtype=bool)
    for n in range(design.min_seeds, design.max_seeds + 1):
        d = diffs[:, :n]
        t = d.mean(axis=1) / (d.std(axis=1, ddof=1) / math.sqrt(n))
        hit = running & (np.abs(t) >= crit[n])
        verdict[hit], used[hit] = np.sign(t[hit]).astype(int), n
        running &= ~hit
    return verdict, used


def upper_bound(k: int, n: int, conf: float = 0.99) -> float:
    """One-sided Clopper-Pearson upper confidence bound on a rate observed k times in n."""
    return 1.0 if k >= n else float(st.beta.ppf(conf, k + 1, n - k))


def test_vectorized_simulation_is_decide_look_by_look():
    rng = np.random.default_rng(7)
    diffs = rng.standard_normal((150, 12)) + rng.choice([0.0, 0.8, -0.8], size=(150, 1))
    verdict, used = simulate(diffs, DESIGN)
    for row, v, u in zip(diffs, verdict, used):
        states = [S.decide(row[:n], design=DESIGN) for n in range(3, 13)]
        first = next((i for i, s in enumerate(states) if s != S.CONTINUE), None)
        assert 3 + first == u
        assert states[first] == {1: S.HOLDS, -1: S.FAILS, 0: S.AT_MAX}[v]
    assert {1, -1, 0} <= set(verdict.tolist())  # the check covered every outcome


NULL_CASES = {
    "normal": lambda rng: rng.standard_normal((SIMS, 12)),
    "t3": lambda rng: rng.standard_t(3, (SIMS, 12)),  # heavier tails: occasional outlier seeds
}


@pytest.mark.parametrize("spending", ["obf", "pocock"])
@pytest.mark.parametrize("case", list(NULL_CASES))
def test_simulated_null_sweeps_rarely_end_with_a_wrong_holds(case, spending):
    design = S.Design(3, 12, spending)
    verdict, used = simulate(NULL_CASES[case](np.random.default_rng(2026)), design)
    holds, fails = int(np.sum(verdict == 1)), int(np.sum(verdict == -1))
    print(f"\nnull {case} {spending}: wrong holds {holds / SIMS:.4f} (99% upper bound {upper_bound(holds, SIMS):.4f}), "
          f"any verdict {(holds + fails) / SIMS:.4f}, mean seeds {used.mean():.2f}")
    assert upper_bound(holds, SIMS) <= 0.05  # the requirement, with a binomial margin
    assert upper_bound(holds + fails, SIMS) <= 0.065  # the design's two-sided rate: 0.05 up to simulation error


def test_simulated_null_sweeps_without_the_design_are_wrong_too_often():
    # the same sweeps judged with the fixed-sample 95% interval at every look: the inflation the design prevents
    naive = {n: S.critical_t(n, n - 1, None) for n in range(3, 13)}
    verdict, _ = simulate(np.random.default_rng(2026).standard_normal((SIMS, 12)), DESIGN, naive)
    assert np.mean(verdict == 1) > 0.05


@pytest.mark.parametrize("spending, case, at_least, seeds_at_most", [
    ("obf", "normal", 0.80, 10.0), ("obf", "t3", 0.80, 10.0), ("pocock", "normal", 0.68, 9.5)])
def test_simulated_sweeps_decide_a_one_sd_effect(spending, case, at_least, seeds_at_most):
    rng = np.random.default_rng(99)
    noise = rng.standard_normal((SIMS, 12)) if case == "normal" else rng.standard_t(3, (SIMS, 12)) / math.sqrt(3)
    verdict, used = simulate(1.0 + noise, S.Design(3, 12, spending))  # effect = 1 sd of the per-seed difference
    rate = float(np.mean(verdict == 1))
    print(f"\neffect 1 sd {case} {spending}: holds {rate:.4f}, wrong 'does not hold' {np.mean(verdict == -1):.4f}, "
          f"mean seeds {used.mean():.2f} (decided sweeps {used[verdict != 0].mean():.2f})")
    assert rate >= at_least and np.mean(verdict == -1) < 0.005
    assert used.mean() <= seeds_at_most


def test_open_pairs_and_cell_intervals():
    steady = [{s: 10.0 * k + 0.1 * (-1) ** s for s in range(4)} for k in range(3)]
    noisy = {s: 10.5 + (3.0 if s % 2 else -3.0) for s in range(4)}
    assert S.order(steady, cells=["a", "b", "c"]).open_pairs() == []
    r = S.order([steady[0], steady[1], noisy], cells=["a", "b", "c"])
    assert r.verdict == S.INCONCLUSIVE and r.open_pairs() == [("c", "b")]
    assert S.better(noisy, steady[1], cells=("c", "b")).open_pairs() == [("c", "b")]
    # mean +- t interval by hand: [1, 2, 3] -> 2 -+ t_{0.975, 2} * 1 / sqrt 3
    m, lo, hi = S.mean_interval({0: 1.0, 1: 2.0, 2: 3.0})
    half = math.sqrt(1.805 / 0.0975) / math.sqrt(3)
    assert (m, lo, hi) == pytest.approx((2.0, 2.0 - half, 2.0 + half))
    assert math.isnan(S.mean_interval([5.0])[1])


def test_seeds_needed_beyond_the_design_is_said():
    a = {s: 0.3 * (-1) ** s + 0.1 for s in range(6)}
    r = S.better(a, {s: 0.0 for s in range(6)}, design=DESIGN)
    assert r.verdict == S.INCONCLUSIVE and r.seeds_needed > 12 and "more than the design's 12 seeds" in r.detail()
