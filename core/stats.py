"""Claim statistics: paired differences, their intervals and p-values, and when to stop adding seeds.

Pure functions over numbers (numpy + scipy); ``core.report`` turns a paper's claims into calls here.

What a claim is judged on
    A cell's results are per seed: ``{seed: value}`` (or a plain list when the seeds are unknown).
    Seed ``s`` means the same data order, evaluation images and shared initial weights in every cell,
    so two cells are compared on the per-seed differences ``d_s = metric(a, s) - metric(b, s)`` over
    the seeds both have (paired t). Without at least two shared seeds (cells that did not share
    seeds, a TPE study) the two cells are compared unpaired with Welch's t. Every result says which
    test it used and reports the mean difference ``a - b`` in the metric's own units.

Verdicts (``alpha`` = 0.05 by default)
    ``better``  a (1 - alpha) interval for the mean difference: *holds* when it lies on the claimed
                side of 0 (the metric's direction decides which side that is), *does not hold* when
                it lies on the other side, *inconclusive* otherwise. ``p`` is the two-sided p-value:
                the smallest alpha whose interval would exclude 0, so p < alpha <=> a verdict.
    ``order``   each neighbouring pair is a ``better`` claim; the pairs' p-values are Holm-adjusted.
                Holds when every pair is decided in the claimed direction, does not hold when any
                pair is decided against it, inconclusive otherwise.
    ``matches`` equivalence by two one-sided tests (TOST) with a tolerance in the metric's units:
                holds when the (1 - 2 alpha) interval lies inside (-tolerance, +tolerance) (p is the
                TOST p-value, the larger of the two one-sided ones), does not hold when that interval
                lies wholly outside [-tolerance, +tolerance], inconclusive otherwise.

Seeds until decided: a group-sequential t-test with Lan-DeMets alpha spending
    A sweep with a seed range runs ``min_seeds`` seeds per cell, then judges after every added seed
    ("a look") up to ``max_seeds``. Reading a plain 95% interval at every look would decide a claim
    with no true difference far more often than 5% of the time (about 9% wrong "holds" alone for
    3-12 seeds). Instead each look has its own critical value from an alpha-spending function of
    the information fraction t = n / max_seeds (Lan & DeMets 1983), alpha / 2 per side:
    O'Brien-Fleming type ``2 - 2 Phi(z_{1-alpha/4} / sqrt t)`` (default; the ld98 / gsDesign
    sfLDOF form: it spends almost nothing at 3-4 seeds, where the t statistic has 2-3 degrees of
    freedom, and keeps the last look close to the fixed-sample test) or Pocock type
    ``(alpha / 2) ln(1 + (e - 1) t)``. The z-scale boundaries come from the recursive numerical
    integration of Armitage, McPherson & Rowe (1969) over the canonical joint distribution of the
    looks (Jennison & Turnbull 2000, "Group Sequential Methods", computations chapter); with the
    variance estimated from the seeds each boundary is applied to the t statistic at its nominal
    level p_k (critical value ``t_{n-1}^{-1}(1 - p_k)``). That conversion is exact look by look but
    not jointly (the looks' variance estimates differ), which for 3-12 seeds inflates the error to
    about 5.7%; the design's nominal alpha is therefore calibrated once by simulating 100 000 null
    sweeps with normal per-seed differences (seeded, ``calibrated_alpha``) so that the simulated
    two-sided error is alpha. The interval at a look is the matching *repeated confidence interval*
    (Jennison & Turnbull, ch. "repeated confidence intervals"): it covers the true difference at
    every look simultaneously with probability about 1 - alpha, so a verdict read at any look of
    the design — the first that decides, or a later one because another claim kept adding seeds to
    the same cells — keeps the error rate; ``p`` is the matching repeated p-value (the design's
    simulated error rate at the nominal level where this look's statistic just crosses), which
    Holm and TOST use unchanged. Welch comparisons under a design use the smaller cell's seed count
    as the look and the paired calibration (approximate). With a fixed seed list (no design) there
    is one look: the ordinary t interval and p-value. tests/test_stats.py simulates adaptive sweeps
    (normal and heavy-tailed per-seed differences) for the error rate under no true difference and
    the decision rate under a true effect of one standard deviation. Limit: strongly skewed per-seed
    differences (e.g. an occasional diverged run) break the t-test's error control at these sizes.

Seeds needed
    For an inconclusive claim: the smallest number of seeds at which a fixed-sample test at the
    claim's level would decide with 80% power if the true effect and spread were the observed ones
    (noncentral t; Welch: seeds per cell with equal counts). An estimate, not a promise: with few
    seeds the observed effect is itself noisy.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import numpy as np
from scipy import optimize, special
from scipy import stats as st

HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
CONTINUE, AT_MAX = "continue", "inconclusive at max"  # decide(): add seeds / the design's maximum is reached
ALPHA = 0.05  # two-sided level: a wrong "holds" at most alpha / 2, a wrong verdict either way at most alpha
POWER = 0.8  # power the seeds-needed estimate aims at
MAX_SEEDS_NEEDED = 10_000  # beyond this the estimate is reported as None ("no practical number")

Values = Union[Mapping[Any, float], Sequence[float]]  # {seed: value} (pairable) or values of unknown seeds


# ------------------------------------------------------------------------------------------------
# group-sequential boundaries
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Design:
    """A seed range judged after every added seed: looks at min_seeds, min_seeds + 1, ..., max_seeds."""

    min_seeds: int = 3  # no verdict before this many seeds
    max_seeds: int = 12  # planned maximum: information fraction 1
    spending: Literal["obf", "pocock"] = "obf"  # Lan-DeMets O'Brien-Fleming or Pocock type

    def __post_init__(self) -> None:
        if not 2 <= self.min_seeds <= self.max_seeds:
            raise ValueError(f"design needs 2 <= min_seeds <= max_seeds, got {self.min_seeds}, {self.max_seeds}")
        if self.spending not in ("obf", "pocock"):
            raise ValueError(f"unknown spending function {self.spending!r} (obf, pocock)")

    def looks(self, n: int) -> tuple[int, ...]:
        """Seed counts of the looks taken up to n seeds (one per added seed; n > max_seeds counts as max)."""
        if n < self.min_seeds:
            return (n,)
        return tuple(range(self.min_seeds, min(n, self.max_seeds) + 1))

    def describe(self) -> str:
        kind = "O'Brien-Fleming" if self.spending == "obf" else "Pocock"
        return f"{kind}-type alpha spending over {self.min_seeds}-{self.max_seeds} seeds"


def design_for(seeds: Any) -> Optional[Design]:
    """The design a sweep's ``seeds`` setting implies: a range ({min, max} mapping or object) is
    sequential; a plain list of seeds is one fixed-sample look (None)."""
    if isinstance(seeds, Mapping):
        lo, hi, spending = seeds.get("min"), seeds.get("max"), seeds.get("spending", "obf")
    else:
        lo, hi, spending = getattr(seeds, "min", None), getattr(seeds, "max", None), getattr(seeds, "spending", "obf")
    if lo is None or hi is None:
        return None
    return Design(min_seeds=int(lo), max_seeds=int(hi), spending=spending)


def spent(t: float, alpha: float, spending: str) -> float:
    """Cumulative two-sided alpha spent by information fraction t (Lan & DeMets 1983)."""
    t = min(max(t, 0.0), 1.0)
    if t == 0.0:
        return 0.0
    if spending == "obf":  # alpha / 2 per side, each spent as 2 - 2 Phi(z_{1 - alpha/4} / sqrt t)
        return float(4.0 * st.norm.sf(st.norm.isf(alpha / 4.0) / math.sqrt(t)))
    if spending == "pocock":
        return float(alpha * math.log1p((math.e - 1.0) * t))
    raise ValueError(f"unknown spending function {spending!r}")


_GRID = 401  # Simpson points per look (odd)
_ZCAP = 9.0  # the continuation region beyond |z| = 9 carries no mass worth integrating
_CMAX = 40.0  # "no crossing possible" boundary
_SQRT2PI = math.sqrt(2.0 * math.pi)


def _simpson(lo: float, hi: float, n: int = _GRID) -> tuple[np.ndarray, np.ndarray]:
    x = np.linspace(lo, hi, n)
    w = np.ones(n)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    return x, w * (hi - lo) / (3.0 * (n - 1))


@lru_cache(maxsize=8192)
def z_boundaries(fracs: tuple[float, ...], alpha: float, spending: str = "obf") -> tuple[float, ...]:
    """Two-sided boundaries c_k on the z scale for looks at information fractions ``fracs``: under no
    difference, P(first |Z_k| >= c_k at look k) = spent(t_k) - spent(t_{k-1}), computed by recursive
    numerical integration of the sub-density of the partial sum S_k = Z_k sqrt(t_k) (Var S_k = t_k)
    over the continuation region."""
    bounds: list[float] = []
    u = wu = None  # previous look's grid and Simpson weight x sub-density
    t_prev = 0.0
    for k, t in enumerate(fracs):
        if not t > t_prev:
            raise ValueError(f"information fractions must increase, got {fracs}")
        target = spent(t, alpha, spending) - spent(t_prev, alpha, spending)
        rt = math.sqrt(t)
        if k == 0:
            c = float(st.norm.isf(target / 2.0)) if target > 0 else _CMAX
        else:
            sd = math.sqrt(t - t_prev)

            def exit_prob(c: float) -> float:
                return float(np.sum(wu * (special.ndtr((u - c * rt) / sd) + special.ndtr((-c * rt - u) / sd))))

            if target <= 0 or not wu.any():
                c = _CMAX
            elif exit_prob(0.0) <= target:
                c = 0.0
            elif exit_prob(_CMAX) >= target:
                c = _CMAX
            else:
                c = optimize.brentq(lambda c: exit_prob(c) - target, 0.0, _CMAX, xtol=1e-10)
        c = min(c, _CMAX)
        bounds.append(c)
        half = min(c, _ZCAP) * rt
        s, w = _simpson(-half, half)
        if k == 0:
            dens = np.exp(-0.5 * (s / rt) ** 2) / (rt * _SQRT2PI)
        else:
            dens = np.exp(-0.5 * ((s[:, None] - u[None, :]) / sd) ** 2) @ wu / (sd * _SQRT2PI)
        u, wu, t_prev = s, w * dens, t
    return tuple(bounds)


def nominal_level(looks: Sequence[int], max_seeds: int, alpha: float, spending: str) -> float:
    """One-sided nominal level of the last look: a t statistic beyond t_{df}^{-1}(1 - level) crosses."""
    fracs = tuple(min(n, max_seeds) / max_seeds for n in looks)
    return float(st.norm.sf(z_boundaries(fracs, float(alpha), spending)[-1]))


_CAL_PATHS = 100_000  # simulated null sweeps for the calibration: +-0.0014 (2 s.e.) on an error rate of 0.05
_CAL_SEED = 14


@lru_cache(maxsize=16)
def _null_tails(min_seeds: int, max_seeds: int) -> np.ndarray:
    """One-sided tails t.sf(|T_n|, n - 1) at looks n = min..max of simulated sweeps with no true
    difference (normal per-seed differences; the t statistic does not depend on their scale)."""
    x = np.random.default_rng(_CAL_SEED).standard_normal((_CAL_PATHS, max_seeds))
    n = np.arange(min_seeds, max_seeds + 1)
    s1, s2 = np.cumsum(x, axis=1)[:, n - 1], np.cumsum(x * x, axis=1)[:, n - 1]
    mean = s1 / n
    t = mean / np.sqrt((s2 - n * mean * mean) / (n - 1) / n)
    return st.t.sf(np.abs(t), n - 1)


def null_error(design: Design, level: float) -> float:
    """Simulated two-sided error rate (a verdict either way with no true difference) of the design's
    t-test run at nominal level ``level``, looking after every seed from min_seeds to max_seeds."""
    fracs = tuple(n / design.max_seeds for n in range(design.min_seeds, design.max_seeds + 1))
    levels = st.norm.sf(np.array(z_boundaries(fracs, float(level), design.spending)))
    return float(np.mean((_null_tails(design.min_seeds, design.max_seeds) <= levels).any(axis=1)))


@lru_cache(maxsize=256)
def calibrated_alpha(design: Design, alpha: float) -> float:
    """The nominal level at which the design's sequential t-test has simulated error rate ``alpha``.
    Converting the z-scale boundaries to t quantiles look by look (nominal levels) is exact for each
    look alone but not jointly: the looks' variance estimates differ, so the t statistics are less
    correlated than the canonical z statistics and the procedure crosses more often than alpha
    (about 0.057 instead of 0.05 for 3-12 seeds). The nominal level is lowered until the simulated
    rate is alpha."""
    if design.min_seeds == design.max_seeds:  # one look: the t test is exact
        return alpha

    def gap(log_a: float) -> float:
        return null_error(design, 10.0 ** log_a) - alpha

    lo = math.log10(alpha) - 1.0
    if gap(math.log10(alpha)) <= 0:  # not inflated: keep the nominal level
        return alpha
    if gap(lo) > 0:
        return 10.0 ** lo
    return float(10.0 ** optimize.brentq(gap, lo, math.log10(alpha), xtol=1e-4))


def critical_t(n: int, df: float, design: Optional[Design], alpha: float = ALPHA) -> float:
    """Critical |t| at a look with n seeds: the fixed-sample t quantile without a design."""
    if design is None:
        return float(st.t.isf(alpha / 2.0, df))
    level = nominal_level(design.looks(n), design.max_seeds, calibrated_alpha(design, alpha), design.spending)
    return float(st.t.isf(level, df))


def critical_values(design: Design, alpha: float = ALPHA) -> dict[int, float]:
    """{n: critical |t|} of the paired t test at every look of the design (df = n - 1)."""
    return {n: critical_t(n, n - 1, design, alpha) for n in range(design.min_seeds, design.max_seeds + 1)}


def repeated_p(t_stat: float, df: float, n: int, design: Optional[Design]) -> float:
    """Two-sided (repeated) p-value: the smallest alpha whose (repeated) interval excludes 0. Under a
    design: the nominal level a at which this look's statistic just crosses, mapped to the design's
    simulated error rate at a (so p < alpha exactly when the calibrated design decides)."""
    if math.isnan(t_stat):
        return math.nan
    tail = float(st.t.sf(abs(t_stat), df))
    if design is None or design.min_seeds == design.max_seeds:  # one look: the ordinary p-value
        return min(1.0, 2.0 * tail)
    looks = design.looks(n)

    def gap(log_a: float) -> float:
        return nominal_level(looks, design.max_seeds, 10.0 ** log_a, design.spending) - tail

    if gap(-0.0001) < 0:
        return 1.0
    a = 1e-15 if gap(-15.0) >= 0 else float(10.0 ** optimize.brentq(gap, -15.0, -0.0001, xtol=1e-5))
    floor = 1e-3  # below it few simulated sweeps cross: scale by the error inflation measured there
    if a >= floor:
        return null_error(design, a)
    return a * null_error(design, floor) / floor


# ------------------------------------------------------------------------------------------------
# the difference between two cells
# ------------------------------------------------------------------------------------------------


@dataclass
class Estimate:
    """Mean difference a - b with its standard error; ``test`` says how it was formed."""

    test: str  # "paired t" | "Welch t" | "" (not enough seeds)
    n: int  # seeds in the look: shared seeds (paired) or the smaller cell (Welch)
    mean: float
    se: float
    df: float
    spread: float  # per-seed sd of the differences (paired) or sqrt(s_a^2 + s_b^2) (Welch): for power
    diffs: dict[str, float] = field(default_factory=dict)  # paired: seed -> d_s


def estimate(a: Values, b: Values) -> Estimate:
    """Paired on the shared seeds when both are {seed: value} with >= 2 seeds in common, else Welch."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        shared = [s for s in a if s in b]
        if len(shared) >= 2:
            d = np.array([float(a[s]) - float(b[s]) for s in shared])
            n = len(d)
            sd = float(d.std(ddof=1))
            return Estimate("paired t", n, float(d.mean()), sd / math.sqrt(n), n - 1.0, sd,
                            {str(s): float(x) for s, x in zip(shared, d)})
    xa = np.array(list(a.values()) if isinstance(a, Mapping) else list(a), dtype=float)
    xb = np.array(list(b.values()) if isinstance(b, Mapping) else list(b), dtype=float)
    na, nb = len(xa), len(xb)
    if na < 2 or nb < 2:
        mean = float(xa.mean() - xb.mean()) if na and nb else math.nan
        return Estimate("", min(na, nb), mean, math.nan, math.nan, math.nan)
    va, vb = float(xa.var(ddof=1)), float(xb.var(ddof=1))
    se2 = va / na + vb / nb
    df = se2 ** 2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1)) if se2 > 0 else na + nb - 2.0
    return Estimate("Welch t", min(na, nb), float(xa.mean() - xb.mean()), math.sqrt(se2), float(df), math.sqrt(va + vb))


def t_stat(mean: float, se: float) -> float:
    if math.isnan(mean) or math.isnan(se):
        return math.nan
    if se == 0:
        return 0.0 if mean == 0 else math.copysign(math.inf, mean)
    return mean / se


def interval(e: Estimate, design: Optional[Design], alpha: float = ALPHA) -> tuple[float, float]:
    """(1 - alpha) interval for the mean difference; a repeated confidence interval under a design."""
    if math.isnan(e.se):
        return math.nan, math.nan
    half = critical_t(e.n, e.df, design, alpha) * e.se
    return e.mean - half, e.mean + half


# ------------------------------------------------------------------------------------------------
# multiplicity, power, sequential decisions
# ------------------------------------------------------------------------------------------------


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values: max_{j <= i} min(1, (m - j + 1) p_(j)) in ascending order;
    nan (an untestable pair) counts as 1."""
    p = np.array([1.0 if math.isnan(x) else float(x) for x in pvalues])
    m = len(p)
    order = np.argsort(p, kind="stable")
    adj = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adj
    return out.tolist()


def _power(n: np.ndarray, effect: float, spread: float, alpha: float, margin: float, welch: bool) -> np.ndarray:
    """Power at n seeds (per cell for Welch) of the fixed-sample test the claim uses, at the observed
    effect: margin 0: two-sided test of 0; margin > 0: TOST within +-margin (its lower bound
    P(A) + P(B) - 1); margin < 0: one-sided test that |effect| exceeds -margin."""
    n = np.asarray(n, dtype=float)
    df = 2.0 * (n - 1) if welch else n - 1.0
    scale = np.sqrt(n) / spread

    def upper(tc: np.ndarray, ncp: np.ndarray) -> np.ndarray:  # P(T' > tc); normal limit where scipy's nct gives nan
        p = st.nct.sf(tc, df, ncp)
        return np.where(np.isfinite(p), p, st.norm.sf(tc - ncp))

    if margin == 0:
        tc = st.t.isf(alpha / 2.0, df)
        return upper(tc, abs(effect) * scale) + upper(tc, -abs(effect) * scale)
    tc = st.t.isf(alpha, df)
    if margin > 0:
        return upper(tc, (effect + margin) * scale) + upper(tc, (margin - effect) * scale) - 1.0
    return upper(tc, (abs(effect) + margin) * scale)


def seeds_needed(effect: float, spread: float, alpha: float = ALPHA, power: float = POWER, *, margin: float = 0.0,
                 welch: bool = False) -> Optional[int]:
    """Smallest seed count (per cell for Welch) at which the fixed-sample test decides with ``power``
    if the true mean difference were ``effect`` and the per-seed spread ``spread``; None when no
    practical number would (no effect seen, an effect exactly at the tolerance, or more than
    MAX_SEEDS_NEEDED)."""
    if not (math.isfinite(effect) and math.isfinite(spread)) or spread <= 0:
        return None
    if (margin == 0 and effect == 0) or (margin > 0 and abs(effect) == margin):
        return None
    if margin > 0 and abs(effect) > margin:
        margin = -margin  # the observed difference is outside the tolerance: seeds to show it does not hold
    for n in (np.arange(2, 257), np.arange(257, MAX_SEEDS_NEEDED + 1)):  # power grows with n: first n reaching it
        ok = np.flatnonzero(_power(n, effect, spread, alpha, margin, welch) >= power)
        if len(ok):
            return int(n[ok[0]])
    return None


def decide(diffs: Sequence[float], looks: Optional[Sequence[int]] = None, design: Design = Design(),
           alpha: float = ALPHA) -> str:
    """Sequential verdict on per-seed differences oriented so that positive favours the claim:
    HOLDS / FAILS when the repeated interval at this look excludes 0, else CONTINUE, or AT_MAX once
    max_seeds are in. ``looks``: the seed counts at which the claim was judged so far, the last one
    being len(diffs) (default: after every seed from min_seeds on)."""
    d = np.asarray(diffs, dtype=float)
    n = len(d)
    if looks is not None and (not looks or looks[-1] != n):
        raise ValueError(f"the last look must be at the current {n} seeds, got looks {list(looks)}")
    if n < design.min_seeds:
        return CONTINUE
    level = nominal_level(looks or design.looks(n), design.max_seeds, calibrated_alpha(design, alpha), design.spending)
    sd = float(d.std(ddof=1))
    t = t_stat(float(d.mean()), sd / math.sqrt(n))
    if abs(t) >= st.t.isf(level, n - 1):
        return HOLDS if t > 0 else FAILS
    return AT_MAX if n >= design.max_seeds else CONTINUE


# ------------------------------------------------------------------------------------------------
# claims
# ------------------------------------------------------------------------------------------------


def _clean(x: Any) -> Any:
    if isinstance(x, float):
        return None if not math.isfinite(x) else x
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


@dataclass
class ClaimResult:
    """One claim's verdict and the numbers behind it; ``to_json()`` is plain JSON (nan -> null)."""

    statement: str  # the claim in words
    kind: str  # better | order | matches
    metric: str
    direction: str  # higher | lower: which way the metric is better
    cells: list[str]  # better/matches: [a, b]; order: worst to best
    test: str  # e.g. "paired t", "Welch t", "TOST (paired t)", "Holm over paired t"
    n: int  # seeds the verdict rests on (order: the fewest over the pairs)
    mean_diff: float  # a - b in the metric's units (order: the pair with the weakest evidence)
    ci: tuple[float, float]
    ci_level: float  # e.g. 0.95; 0.90 for TOST at alpha 0.05
    p: float  # two-sided (repeated) p-value; TOST p for matches; largest Holm-adjusted p for order
    verdict: str
    seeds_needed: Optional[int] = None  # inconclusive: seeds that would decide it (see module doc)
    alpha: float = ALPHA
    design: str = "fixed seeds"  # or the group-sequential design
    tolerance: Optional[float] = None  # matches: in metric units
    note: str = ""  # e.g. how the tolerance was chosen, why there is no verdict
    diffs: dict[str, float] = field(default_factory=dict)  # paired: seed -> a - b
    pairs: list["ClaimResult"] = field(default_factory=list)  # order: one better-claim per neighbour pair

    def open_pairs(self) -> list[tuple[str, str]]:
        """Cell pairs whose comparison is still undecided (where more seeds would help); [] once decided."""
        if self.verdict != INCONCLUSIVE:
            return []
        if self.kind == "order":
            return [(pr.cells[0], pr.cells[1]) for pr in self.pairs if pr.verdict == INCONCLUSIVE]
        return [(self.cells[0], self.cells[1])]

    def to_json(self) -> dict[str, Any]:
        return _clean(asdict(self))

    def detail(self) -> str:
        """One line for the report: test, n, mean difference with its interval, p, seeds needed."""
        if not self.test:
            return self.note or "not enough seeds"
        fmt = _num
        text = (f"{self.test}, {self.n} seeds: {fmt(self.mean_diff, True)} "
                f"[{fmt(self.ci[0])}, {fmt(self.ci[1])}] ({self.ci_level:.0%}"
                f"{' repeated' if self.design != 'fixed seeds' else ''} CI), p = {_p(self.p)}")
        if self.kind == "order":
            text = "; ".join(f"{pr.cells[0]} vs {pr.cells[1]}: {fmt(pr.mean_diff, True)} [{fmt(pr.ci[0])}, "
                             f"{fmt(pr.ci[1])}], Holm p = {_p(pr.p)}, {pr.verdict}" for pr in self.pairs)
            text = f"{self.test}: {text}"
        if self.tolerance is not None:
            text += f"; tolerance ±{fmt(self.tolerance)}"
        if self.note:
            text += f"; {self.note}"
        if self.verdict == INCONCLUSIVE:
            text += (f"; about {self.seeds_needed} seeds would decide it" if self.seeds_needed
                     else "; no practical number of seeds would decide it at the observed effect")
        return text


def _num(x: float, sign: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:+.3g}" if sign else f"{x:.3g}"


def _p(p: float) -> str:
    return "n/a" if p is None or math.isnan(p) else (f"{p:.2g}" if p >= 1e-4 else "<1e-4")


def _too_few(a: Values, b: Values, cells: Sequence[str]) -> str:
    return f"needs 2 seeds per cell ({cells[0]}: {len(a)}, {cells[1]}: {len(b)})"


def _beyond_design(res: ClaimResult, design: Optional[Design]) -> None:
    if design is not None and res.seeds_needed is not None and res.seeds_needed > design.max_seeds:
        res.note = "; ".join(x for x in (res.note, f"more than the design's {design.max_seeds} seeds") if x)


def mean_interval(values: Values, alpha: float = ALPHA) -> tuple[float, float, float]:
    """(mean, low, high): a cell's mean over seeds with its (1 - alpha) t interval (nan bounds below 2 seeds)."""
    x = np.array(list(values.values()) if isinstance(values, Mapping) else list(values), dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    m = float(x.mean())
    if len(x) < 2:
        return m, math.nan, math.nan
    half = float(st.t.isf(alpha / 2.0, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return m, m - half, m + half


def _design_name(design: Optional[Design]) -> str:
    return "fixed seeds" if design is None else design.describe()


def better(a: Values, b: Values, *, higher_is_better: bool = True, design: Optional[Design] = None,
           alpha: float = ALPHA, statement: str = "", metric: str = "", cells: Sequence[str] = ("a", "b")) -> ClaimResult:
    """``a`` is better than ``b``: verdict from the (repeated) interval of a - b."""
    e = estimate(a, b)
    res = ClaimResult(statement, "better", metric, "higher" if higher_is_better else "lower", list(cells), e.test, e.n,
                      e.mean, (math.nan, math.nan), 1.0 - alpha, math.nan, INCONCLUSIVE, alpha=alpha,
                      design=_design_name(design), diffs=e.diffs)
    if not e.test:
        res.note = _too_few(a, b, cells)
        return res
    res.ci = interval(e, design, alpha)
    res.p = repeated_p(t_stat(e.mean, e.se), e.df, e.n, design)
    lo, hi = res.ci if higher_is_better else (-res.ci[1], -res.ci[0])  # oriented: > 0 favours the claim
    if design is not None and e.n < design.min_seeds:
        res.note = f"no verdict before {design.min_seeds} seeds"
    elif lo > 0:
        res.verdict = HOLDS
    elif hi < 0:
        res.verdict = FAILS
    if res.verdict == INCONCLUSIVE:
        res.seeds_needed = seeds_needed(e.mean, e.spread, alpha, welch=e.test == "Welch t")
        _beyond_design(res, design)
    return res


def matches(a: Values, b: Values, tolerance: float, *, design: Optional[Design] = None, alpha: float = ALPHA,
            statement: str = "", metric: str = "", cells: Sequence[str] = ("a", "b"), direction: str = "higher",
            note: str = "") -> ClaimResult:
    """``a`` matches ``b`` within ±tolerance (metric units): two one-sided tests at level alpha each,
    read from the (1 - 2 alpha) interval."""
    e = estimate(a, b)
    res = ClaimResult(statement, "matches", metric, direction, list(cells), e.test and f"TOST ({e.test})", e.n, e.mean,
                      (math.nan, math.nan), 1.0 - 2.0 * alpha, math.nan, INCONCLUSIVE, alpha=alpha,
                      design=_design_name(design), tolerance=tolerance, note=note, diffs=e.diffs)
    if not e.test:
        res.note = "; ".join(x for x in (note, _too_few(a, b, cells)) if x)
        return res
    if not (math.isfinite(tolerance) and tolerance > 0):
        res.note = "; ".join(x for x in (note, "no usable tolerance") if x)
        return res
    res.ci = interval(e, design, 2.0 * alpha)
    # one-sided (repeated) p of "difference <= -tol" and of "difference >= +tol": half the two-sided
    # p of the shifted statistic on the favourable side, 1 - that on the other
    ps = []
    for shifted in (t_stat(e.mean + tolerance, e.se), -t_stat(e.mean - tolerance, e.se)):
        half = repeated_p(shifted, e.df, e.n, design) / 2.0
        ps.append(half if shifted > 0 else 1.0 - half)
    res.p = max(ps)
    if design is not None and e.n < design.min_seeds:
        res.note = "; ".join(x for x in (note, f"no verdict before {design.min_seeds} seeds") if x)
    elif -tolerance < res.ci[0] and res.ci[1] < tolerance:
        res.verdict = HOLDS
    elif res.ci[0] > tolerance or res.ci[1] < -tolerance:
        res.verdict = FAILS
    if res.verdict == INCONCLUSIVE:
        res.seeds_needed = seeds_needed(e.mean, e.spread, alpha, margin=tolerance, welch=e.test == "Welch t")
        _beyond_design(res, design)
    return res


def order(values: Sequence[Values], *, higher_is_better: bool = True, design: Optional[Design] = None,
          alpha: float = ALPHA, statement: str = "", metric: str = "", cells: Optional[Sequence[str]] = None) -> ClaimResult:
    """Cells from worst to best: each neighbour pair a better-claim, Holm-adjusted over the pairs."""
    cells = list(cells or [str(i) for i in range(len(values))])
    pairs = [better(values[i + 1], values[i], higher_is_better=higher_is_better, design=design, alpha=alpha,
                    metric=metric, cells=(cells[i + 1], cells[i]), statement=f"{cells[i + 1]} better than {cells[i]}")
             for i in range(len(values) - 1)]
    for pr, adj in zip(pairs, holm([pr.p for pr in pairs])):
        pr.p = adj
        if pr.test and adj < alpha and not pr.note:  # decided by Holm: the direction is the sign of the difference
            favours = pr.mean_diff > 0 if higher_is_better else pr.mean_diff < 0
            pr.verdict = HOLDS if favours else FAILS
        else:
            pr.verdict = INCONCLUSIVE
        pr.seeds_needed = None
    verdicts = [pr.verdict for pr in pairs]
    verdict = FAILS if FAILS in verdicts else (HOLDS if all(v == HOLDS for v in verdicts) else INCONCLUSIVE)
    weakest = max(pairs, key=lambda pr: (math.inf if math.isnan(pr.p) else pr.p))
    tests = sorted({pr.test for pr in pairs if pr.test})
    res = ClaimResult(statement, "order", metric, "higher" if higher_is_better else "lower", cells,
                      f"Holm over {' / '.join(tests)}" if tests else "", min(pr.n for pr in pairs), weakest.mean_diff,
                      weakest.ci, weakest.ci_level, weakest.p, verdict, alpha=alpha, design=_design_name(design),
                      pairs=pairs)
    if verdict == INCONCLUSIVE:
        open_pairs = [pr for pr in pairs if pr.verdict == INCONCLUSIVE and pr.test]
        need = []
        for pr in open_pairs:  # Bonferroni level for the open pairs: conservative
            e = estimate(values[cells.index(pr.cells[0])], values[cells.index(pr.cells[1])])
            need.append(seeds_needed(e.mean, e.spread, alpha / len(pairs), welch=e.test == "Welch t"))
        res.seeds_needed = None if not need or None in need else max(need)
    return res
