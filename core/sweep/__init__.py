"""Sweeps: an experiment's ``sweep:`` section run as an Optuna study, one MLflow child run per cell and seed.

``sampler: grid`` enumerates every cell and seed exactly: the planner enqueues the missing ones
as WAITING trials and workers claim them atomically (the storage's WAITING -> RUNNING transition),
so N workers on one machine (``workers: N``) or on many (a PostgreSQL ``storage``) never run a cell
twice; a failed cell is recorded FAIL with its error and re-running the command runs only the
missing or failed cells. Seeds and cells may be added to a study; with a seed range
(``seeds: {min, max}``) the sweep adds seeds to the pairs of cells a still open claim compares until
every claim is decided (``adaptive``). ``sampler: tpe`` runs ``n_trials``
TPE trials (each over every seed, the objective averaged) with optional median pruning.

The study is the config: its name carries a digest of everything that determines the results
(``study.identity``), so a changed config never reuses another config's results.

Modules: ``space`` (the section, its cells), ``paper`` (the paper section and the checks tying it to
the cells), ``study`` (storage and study: the only Optuna code), ``record`` (the typed per-trial
record the report reads), ``runs`` (MLflow parent and child runs), ``workers`` (running cells).
"""
from __future__ import annotations

import shlex
import sys
import time
from typing import Any, Sequence

from core.sweep import adaptive, runs
from core.sweep import study as st
from core.sweep.paper import Claim, Paper, check_paper, parse_paper
from core.sweep.record import TrialRecord, TrialView
from core.sweep.space import (Cell, Choices, Range, SweepConfig, cell_label, check_all, check_size, checked_points,
                              compose, count_points, grid_points, parse_sweep, plan, pool, validate_cell)
from core.sweep.study import open_study, study_name
from core.sweep.workers import INTERRUPTED, run_trial, run_workers, suggest

__all__ = ["Cell", "Choices", "Claim", "Paper", "Range", "SweepConfig", "TrialRecord", "TrialView", "cell_label",
           "check_all", "check_paper", "check_size", "checked_points", "compose", "count_points", "grid_points", "main",
           "open_study", "parse_paper", "parse_sweep", "plan", "run_trial", "run_workers", "study_name", "suggest",
           "validate_cell"]


def print_plan(exp: Any, sw: SweepConfig, cells: list[Cell]) -> None:
    print(f"# sweep {study_name(exp, sw)}: sampler {sw.sampler}, objective {sw.objective.direction} {sw.objective.metric}, "
          f"storage {st.display_storage(sw.storage_url())}, workers {sw.workers}")
    if sw.sampler == "grid":
        labels = list(dict.fromkeys(c.label for c in cells))
        rng = sw.seed_range
        if rng is None:
            print(f"# {len(labels)} cells x {len(sw.seeds)} seeds = {len(cells)} runs")
        else:
            from core import stats

            compared = {c for claim in (exp.paper or Paper()).claims for c in claim.cells()} & set(labels)
            most = len(compared) * rng.max + (len(labels) - len(compared)) * rng.min
            print(f"# {len(labels)} cells x {rng.min} to {rng.max} seeds = {len(cells)} to {most} runs: seeds 0..{rng.min - 1} "
                  f"in every cell, then one seed at a time in the {len(compared)} cells the claims compare while a claim "
                  f"is open ({stats.design_for(rng).describe()})"
                  + (f", within {rng.budget_minutes:g} min of sweep wall time" if rng.budget_minutes else ""))
        for pt in grid_points(sw):
            print(f"{cell_label(pt)}: " + ", ".join(f"{k}={runs.choice_params({k: v})['sweep.' + k]}" for k, v in pt.items()))
    else:
        print(f"# {sw.n_trials} TPE trials x {len(sw.seeds)} seeds; space:")
        for key, p in sw.space.items():
            desc = ", ".join(p.choices) if isinstance(p, Choices) else f"[{p.low}, {p.high}]{' log' if p.log else ''}"
            print(f"{key}: {desc}")


def report_command(path: str, overrides: Sequence[str]) -> str:
    return "python -m core.report " + shlex.join([path, *overrides])


def main(path: str, raw: dict[str, Any], exp: Any, dry_run: bool = False, overrides: Sequence[str] = ()) -> int:
    """Plan the study (``exp`` was validated, with every cell, by ``core.config.validate``), run the
    workers, close the MLflow parent. Returns the exit status: 0, 1 (failed cells), 130 (stopped)."""
    from core.config import to_dict

    sw: SweepConfig = exp.sweep
    if dry_run:
        print_plan(exp, sw, check_all(raw, sw))
        return 0
    st.check_storage(sw.storage_url())
    study = st.open_study(exp, sw)
    storage = st.display_storage(sw.storage_url())
    stale = st.fail_stale(study)
    if stale:
        runs.close_runs([rid for _, rec in stale for rid in rec.run_ids.values()], exp.tracking, "KILLED",
                        study.user_attrs.get(st.PARENT_RUN), {str(n) for n, _ in stale})
    keys: list[str] | None = None
    if sw.sampler == "grid":
        points = checked_points(raw, sw)
        st.check_cell_configs(study, {cell_label(pt): st.run_identity(to_dict(c)) for pt, c in points})
        cells = plan(sw)
        if sw.seed_range is not None:  # the seeds earlier rounds added (a killed command's unfinished ones)
            cells += adaptive.planned(study, sw)
        keys = [c.key for c in cells]
        st.drop_waiting(study, {c.key for c in pool(sw)}, "not in this command's plan (its cells or seeds differ)")
        added = st.enqueue_missing(study, cells)
        total = len(cells)
        print(f"vtok sweep: study '{study.study_name}' ({storage}): {total - added} of {total} runs done or under way, "
              f"{added} to run", file=sys.stderr)
    else:
        total = sw.n_trials * len(sw.seeds)
        done = st.count_trials(study, "COMPLETE", "PRUNED")
        print(f"vtok sweep: study '{study.study_name}' ({storage}): {done} of {sw.n_trials} trials done", file=sys.stderr)
    parent_id = runs.parent_run(exp, sw, study, total)
    t0 = time.perf_counter()
    spent = adaptive.SpentTime(study) if sw.seed_range is not None else None
    budget = sw.seed_range.budget_minutes if sw.seed_range is not None else None
    if budget is not None and adaptive.spent_seconds(study):
        print(f"vtok sweep: seed budget: {adaptive.spent_seconds(study) / 60:.1f} of {budget:g} min spent by earlier "
              "commands of this study", file=sys.stderr)
    clean = False
    since = len(study.get_trials(deepcopy=False))
    try:
        # one display for the whole sweep: rounds that add seeds grow its total
        with watch(study, sw, exp, total, on_landed=spent.save if spent else None) as watcher:
            failed, interrupted, errors = run_workers(raw, sw)
            while spent is not None and not interrupted and not errors:  # seeds until decided
                watcher.poll()  # this round's lines before the planner's
                spent.save()
                if budget is not None and spent.total() >= 60 * budget:
                    watcher.progress.write(f"vtok sweep: the seed budget of {budget:g} min is spent "
                                           f"({spent.total() / 60:.1f} min over this study's commands)")
                    break
                more, _ = adaptive.next_cells(study, sw, exp.paper or Paper(), since)
                added = st.enqueue_missing(study, more)
                if not added:
                    break
                keys = list(dict.fromkeys([*keys, *(c.key for c in more)]))
                watcher.progress.grow(len(keys))
                watcher.progress.write(f"vtok sweep: claims still open: {added} more runs ("
                                       + ", ".join(c.key for c in more) + ")")
                f, interrupted, errors = run_workers(raw, sw)
                failed += f
        clean = not interrupted and not errors
    finally:
        if spent is not None:
            spent.save()
        if not clean:  # nothing is left RUNNING or WAITING by this command
            stale = st.fail_stale(study, mine=True)
            runs.close_runs([rid for _, rec in stale for rid in rec.run_ids.values()], exp.tracking, "KILLED")
            if not st.others_running(study):
                st.drop_waiting(study, set(), "not run: the sweep stopped before it")
                runs.close_runs([parent_id], exp.tracking, "KILLED")
    if interrupted:
        print("vtok sweep: interrupted; the running cells saved checkpoints: run the same command to resume them",
              file=sys.stderr)
        return 130
    for err in errors:
        print(f"vtok sweep: a worker stopped: {err}", file=sys.stderr)
    runs.finish_parent(exp, study, keys)
    print(f"vtok sweep: done in {time.perf_counter() - t0:.0f} s; failed runs: {failed}. "
          f"Report: {report_command(path, overrides)}", file=sys.stderr)
    summarise(raw, exp, overrides)
    return 1 if failed or errors else 0


def watch(study: Any, sw: SweepConfig, exp: Any, total: int, on_landed: Any = None) -> Any:
    """A live line per landed run (cell, seed, objective) and a whole-sweep bar with an ETA (core.progress);
    ``on_landed()`` is called after runs landed."""
    from core.progress import StudyWatcher, SweepProgress

    per_trial = 1 if sw.sampler == "grid" else len(sw.seeds)

    def record(t: Any) -> TrialRecord:
        return TrialRecord.from_attrs(t.user_attrs) or TrialRecord()

    def label(t: Any) -> str:
        rec = record(t)
        cell = rec.cell or f"#{t.number}"
        return f"{cell} seed {rec.seeds[0]}" if sw.sampler == "grid" and rec.seeds else f"trial {t.number} {cell}"

    def runs_of(t: Any) -> int:  # a dropped trial or a cell stopped by Ctrl-C (it resumes) did not land
        rec = record(t)
        return 0 if rec.not_run or (t.state.name == "FAIL" and rec.error == INTERRUPTED) else per_trial

    done = sum(runs_of(t) for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE")
    progress = SweepProgress(total, min(done, total), sw.objective.metric, bar=exp.train.progress)
    return StudyWatcher(study, progress, label, runs_of, on_landed=on_landed)


def summarise(raw: dict[str, Any], exp: Any, overrides: Sequence[str] = ()) -> None:
    """Write the report and put it and the per-cell means on the parent run (``python -m core.report``
    does the same on demand); never fails the sweep."""
    from pathlib import Path

    from core import report

    try:
        _, md_path, png, attached = report.write_report(raw, exp, Path(exp.train.out_dir).parent / "reports",
                                                        overrides=list(overrides))
        print(f"vtok sweep: report {md_path}, {png}" + (f" (attached to the parent MLflow run {attached})" if attached else ""),
              file=sys.stderr)
        if attached:
            from core.tracking import ui_hint

            print(f"vtok sweep: to look: {ui_hint(exp.tracking.uri, run_id=attached)}", file=sys.stderr)
    except Exception as e:  # noqa: BLE001 - the sweep's results are stored; the report can be rebuilt
        print(f"vtok sweep: no report ({type(e).__name__}: {e})", file=sys.stderr)
