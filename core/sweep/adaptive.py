"""Seeds until decided: the planner of a grid sweep with ``seeds: {min, max, budget_minutes}``.

After every cell ran seeds 0 .. min-1, the claims of the ``paper`` section are judged (core.report
with core.stats' group-sequential design for the range: repeated intervals, valid at every look),
and each still open pair of cells a claim compares (``ClaimResult.open_pairs``) gets one more seed —
the same seed in both cells: the lowest seed below ``max`` the two cells do not both have. The
workers run the added trials, and the claims are judged again, until every claim is decided, every
open pair has ``max`` seeds or the wall-time budget is spent.

The state is the study's trials: which (cell, seed) was planned is a trial, a (cell, seed) that has
a COMPLETE (or live) trial is never enqueued again, and a re-run re-enqueues the planned trials a
killed command did not finish, then judges again from what completed.

The budget (``budget_minutes``) is the sweep's wall time over all its commands, not one command's:
each command records its own running time in a study attribute of its own (``SPENT`` + host, pid
and start time; no two commands write the same key, so concurrent commands on several machines
never lose each other's time, and both count), saved whenever a trial lands, after every round and
when the command stops (Ctrl-C, SIGTERM, an error). A command killed outright (SIGKILL) loses at
most the time since its last landed trial. Before adding seeds the planner sums every command's
time; once the sum reaches the budget no more seeds are added (the minimum seeds, and seeds an
earlier round planned that a killed command did not finish, still run).
"""
from __future__ import annotations

import time
from typing import Any

from core.sweep import study as st
from core.sweep.space import Cell, SweepConfig, cell_label, grid_points, pool


SPENT = "vtok.sweep_seconds:"  # study user attribute + command id -> that command's running time (s)
clock = time.monotonic  # the running time's clock (tests replace it)


def spent_seconds(study: Any, but: str | None = None) -> float:
    """The sweep's running time over every command recorded in the study (except key ``but``)."""
    attrs = study.user_attrs  # read from the storage now: other commands may have written since
    return float(sum(v for k, v in attrs.items() if k.startswith(SPENT) and k != but and isinstance(v, (int, float))))


class SpentTime:
    """This command's share of the sweep's running time, recorded in the study (see the module doc)."""

    def __init__(self, study: Any) -> None:
        self.study = study
        self.key = f"{SPENT}{st.owner()}:{time.time():.3f}"
        self.t0 = clock()

    def mine(self) -> float:
        return clock() - self.t0

    def save(self) -> None:
        st.set_attr(self.study, self.key, round(self.mine(), 3))

    def total(self) -> float:
        """Seconds spent by the earlier (and concurrent) commands plus this one's so far."""
        return spent_seconds(self.study, but=self.key) + self.mine()


def planned(study: Any, sw: SweepConfig) -> list[Cell]:
    """The seeds beyond the minimum that earlier rounds planned (a trial of theirs exists in the study)."""
    by_key = {c.key: c for c in pool(sw) if c.seed not in sw.seeds}
    keys = {st.record_of(t).key for t in study.get_trials(deepcopy=False)}
    return [c for k, c in by_key.items() if k in keys]


def next_cells(study: Any, sw: SweepConfig, paper: Any, since: int = 0) -> tuple[list[Cell], list[Any]]:
    """(cells to add, the claims' results) after judging what completed. ``since``: trials numbered
    from here on that failed are not retried by this command (a broken cell must not loop)."""
    from core import report, stats
    from core.sweep import results

    trials = st.read_trials(study)
    values, _, _, _ = results.collect(trials, "grid")
    broken = {t.record.key for t in trials if t.number >= since and t.state == "FAIL" and not t.record.not_run
              and t.record.error != "interrupted"}
    design = stats.design_for(sw.seed_range)
    choices = {cell_label(pt): pt for pt in grid_points(sw)}
    adds: dict[str, Cell] = {}
    found = []
    for claim in paper.claims:
        res = report.judge_claim(claim, values, paper, design)
        found.append(res)
        for a, b in res.open_pairs():
            if a not in choices or b not in choices:
                continue
            have = [set(values.get(c, {}).get(claim.metric, {})) for c in (a, b)]
            shared = have[0] & have[1]
            if len(shared) >= sw.seed_range.max:
                continue
            for s in range(sw.seed_range.max):
                if s in shared or any(f"{c}#seed={s}" in broken for c in (a, b)):
                    continue
                for c in (a, b):
                    if s not in values.get(c, {}).get(claim.metric, {}):
                        cell = Cell(choices=choices[c], seed=s)
                        adds[cell.key] = cell
                break
    return list(adds.values()), found
