"""``python -m core.reproduce``: run (or resume) every paper experiment, store the results as data, rebuild docs/RESULTS.md.

Every ``experiments/*.yaml`` with a ``sweep:`` and a ``paper:`` section is a paper experiment. The
command runs them one after another, each by the same entry point as ``python -m core.run EXP.yaml``
(called in this process: identical validation, exit statuses and resume rules, no second
interpreter start per experiment; a sweep's workers are processes of their own anyway). A finished
run is never repeated: the sweep's journal knows which (cell, seed) completed and an interrupted run
resumes from its checkpoint, so the command can be killed and run again, in pieces.

Dependencies are resolved from the configs: an experiment whose ``distill`` loss names a vtok
teacher (``teacher: {weights: runs/clip_teacher}``) needs the experiment that writes runs under that
prefix (``<train.out_dir>/<name>``, i.e. ``experiments/clip_teacher.yaml``); when no finished run is
there, the teacher is trained first.

After each experiment its results become a small file ``results/<experiment>.json`` (schema below:
per-cell per-seed final metrics, the claims' verdicts from ``core.report``'s JSON summary, learning
curves from MLflow; floats to 6 significant digits, sorted keys, so a diff shows what changed), and
``docs/RESULTS.md`` (with plots in ``docs/results/``) is rebuilt from those files alone:
``--report-only`` does only that. Experiments without a results file are listed with their claims
"not run".

A grid experiment's record also lists its reconstruction and sample grids, PNGs stored next to it
(``results/<experiment>.recon.png``, ``.samples.png``; made by ``core.reproduce_grids``).

A paper section may name further datasets (``paper.also_on: [{type: fashion_mnist, image_size: 32}]``):
the file then also runs, right after itself, as the experiment ``<name>_<dataset type>`` (the same
file with the overrides ``name=...``, ``data=<that mapping>``, ``paper.also_on=[]``: its own study,
run directories and ``results/<name>_<type>.json``). The page's claim table has a row per claim and
dataset, and lists the claims whose verdicts disagree between datasets. ``--only NAME`` runs exactly
the experiments named: the base alone, or a variant by its own name.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from pydantic import BaseModel, ConfigDict, Field

from core.errors import ConfigError, one_line

SCHEMA = 1
DIGITS = 6  # significant digits of every stored float
NOT_RUN = "not run"


# ------------------------------------------------------------------------------------------------
# experiments and their dependencies
# ------------------------------------------------------------------------------------------------


@dataclass
class Experiment:
    name: str
    path: Path
    raw: dict[str, Any]
    paper: bool  # a paper experiment (sweep + paper section); else a dependency such as the teacher
    teachers: list[str] = field(default_factory=list)  # vtok teacher weights paths its distill losses name
    overrides: list[str] = field(default_factory=list)  # key=value overrides the file runs with (a dataset variant's)
    base: Optional[str] = None  # a dataset variant (paper.also_on): the experiment it judges on another dataset

    @property
    def family(self) -> str:
        """The experiment whose claims these are: the base of a dataset variant, else its own name."""
        return self.base or self.name

    @property
    def where(self) -> str:
        """``experiments/x.yaml`` (a variant: ``... on fashion_mnist 32 px``)."""
        return f"{self.path} on {_dataset(self.raw.get('data') or {})}" if self.base else str(self.path)

    @property
    def run_prefix(self) -> str:
        """``<train.out_dir>/<name>``: the run-name prefix a single run of this file writes under."""
        out = (self.raw.get("train") or {}).get("out_dir", "runs")
        return os.path.normpath(os.path.join(str(out), self.name))


def discover(exp_dir: str | Path) -> dict[str, Experiment]:
    """Every experiment file of ``exp_dir`` (not its subdirectories), by experiment name."""
    from core.config import read_yaml

    d = Path(exp_dir)
    if not d.is_dir():
        raise ConfigError("--experiments-dir", f"{d}: not a directory")
    found: dict[str, Experiment] = {}
    for path in sorted(d.glob("*.yaml")):
        raw = read_yaml(path)
        if not isinstance(raw, dict):
            raise ConfigError(str(path), "not a mapping")
        name = raw.get("name") or path.stem
        if name in found:
            raise ConfigError(str(path), f"experiment name '{name}' is also used by {found[name].path}")
        found[name] = Experiment(name, path, raw, bool(raw.get("sweep")) and bool(raw.get("paper")), _teachers(raw))
        for v in variants(found[name]):
            if v.name in found:
                raise ConfigError(str(path), f"experiment name '{v.name}' (a paper.also_on variant) is also used by "
                                  f"{found[v.name].path}")
            found[v.name] = v
    return found


def variants(e: Experiment) -> list[Experiment]:
    """A paper experiment's ``paper.also_on`` datasets as experiments of their own (``<name>_<type>``,
    run with ``core.sweep.paper.variant_overrides``); the entries' full validation is the
    experiment's (``core.sweep.paper.check_also_on``), here only what naming them needs."""
    from core.config import apply_overrides
    from core.sweep.paper import check_variant_types, parse_paper, variant_name, variant_overrides

    if not e.paper:
        return []
    try:
        entries = parse_paper(e.raw.get("paper")).also_on
        for i, data in enumerate(entries):
            if not isinstance(data.get("type"), str):
                raise ConfigError(f"paper.also_on.{i}.type",
                                  "missing (a dataset mapping such as {type: fashion_mnist, image_size: 32})")
        check_variant_types(e.name, (e.raw.get("data") or {}).get("type"), entries)
    except ConfigError as err:
        raise ConfigError(str(e.path), str(err)) from None
    out = []
    for data in entries:
        ov = variant_overrides(e.name, data)
        out.append(Experiment(variant_name(e.name, data), e.path, apply_overrides(e.raw, ov), True, list(e.teachers), ov, e.name))
    return out


def _teachers(raw: dict[str, Any]) -> list[str]:
    out = []
    for loss in raw.get("losses") or []:
        if isinstance(loss, dict) and loss.get("type") == "distill":
            t = loss.get("teacher") or {}
            if isinstance(t, dict) and t.get("kind", "vtok") == "vtok" and isinstance(t.get("weights"), str):
                out.append(t["weights"])
    return out


def teacher_ready(weights: str) -> bool:
    """The run the distill loss will load from ``weights`` (core.rundir.find_run_dir: that run
    directory, or the newest run of the experiment it names) is finished (its completion marker)."""
    from core import rundir

    try:
        found = rundir.find_run_dir(weights)
    except ConfigError:  # ambiguous: the student's own validation says so when it runs
        return False
    return found is not None and rundir.read_complete(found) is not None


def producer(weights: str, exps: dict[str, Experiment]) -> Experiment | None:
    """The single-run experiment whose runs land under the teacher path ``weights``."""
    want = os.path.normpath(weights)
    return next((e for e in exps.values() if not e.raw.get("sweep") and e.run_prefix == want), None)


def resolve(only: list[str] | None, exps: dict[str, Experiment],
            ready: Callable[[str], bool] = teacher_ready) -> list[tuple[Experiment, str]]:
    """[(experiment, why)] in running order: the selected ones (``only``, names or file stems; default
    every paper experiment) in file order, each preceded by the dependencies it lacks."""
    by_stem = {e.path.stem: e for e in exps.values() if e.base is None}
    if only:
        chosen = []
        for n in only:
            e = exps.get(n) or by_stem.get(n)
            if e is None:
                raise ConfigError("--only", f"unknown experiment '{n}' (experiments: {', '.join(sorted(exps))})")
            chosen.append(e.name)
    else:
        chosen = [e.name for e in exps.values() if e.paper]
    order = [e.name for e in exps.values()]  # file order
    plan: list[tuple[Experiment, str]] = []

    def add(e: Experiment, why: str, stack: tuple[str, ...] = ()) -> None:
        if e.name in stack:
            raise ConfigError(str(e.path), "dependency cycle: " + " -> ".join([*stack, e.name]))
        if any(p.name == e.name for p, _ in plan):
            return
        for w in e.teachers:
            dep = producer(w, exps)
            if dep is not None and not ready(w):
                add(dep, f"teacher of {e.name}: no finished run at {w}", (*stack, e.name))
        plan.append((e, why))

    for name in sorted(set(chosen), key=order.index):
        add(exps[name], "selected" if only else "paper experiment")
    return plan


# ------------------------------------------------------------------------------------------------
# the plan in words
# ------------------------------------------------------------------------------------------------


def seeds_text(seeds: Any) -> str:
    """``[0, 1, 2]`` or ``{min: 3, max: 10}`` (a seed range: more seeds while claims are open)."""
    if isinstance(seeds, dict):
        lo, hi = seeds.get("min", 3), seeds.get("max", 12)
        budget = f", within {seeds['budget_minutes']:g} min" if seeds.get("budget_minutes") else ""
        return f"seeds 0-{lo - 1}, up to {hi} while a claim is open{budget}"
    return f"seeds {list(seeds or [0])}"


def shape(e: Experiment) -> tuple[str, int]:
    """(what runs, in words; the number of runs planned before any seed is added)."""
    steps = (e.raw.get("train") or {}).get("steps")
    if not e.raw.get("sweep"):
        return f"single run, {steps} steps", 1
    from core.sweep.space import grid_points, parse_sweep

    sw = parse_sweep(e.raw["sweep"])
    if sw.sampler == "tpe":
        return f"tpe {sw.n_trials} trials x {len(sw.seeds)} seed(s), {steps} steps", sw.n_trials * len(sw.seeds)
    n = len(list(grid_points(sw)))
    return f"grid {n} cells x {seeds_text(e.raw['sweep'].get('seeds'))}, {steps} steps", n * len(sw.seeds)


def cells_text(e: Experiment) -> str:
    """``grid 4 cells`` / ``tpe 16 trials``."""
    from core.sweep.space import grid_points, parse_sweep

    sw = parse_sweep(e.raw["sweep"])
    return f"tpe {sw.n_trials} trials" if sw.sampler == "tpe" else f"grid {len(list(grid_points(sw)))} cells"


def print_plan(plan: list[tuple[Experiment, str]], results_dir: Path, budget: float | None) -> None:
    print(f"vtok reproduce: {len(plan)} experiment(s)" + (f", budget {budget:g} min" if budget else ", no budget"))
    for i, (e, why) in enumerate(plan, 1):
        what, _ = shape(e)
        stored = results_dir / f"{e.name}.json"
        extra = [f"needs {w} ({'present' if teacher_ready(w) else 'missing'})" for w in e.teachers]
        if e.paper:
            extra.append(f"results {stored}" + (" (exists)" if stored.is_file() else ""))
        print(f"{i}. {e.name} ({e.where}): {what}; {why}" + "".join(f"; {x}" for x in extra))


# ------------------------------------------------------------------------------------------------
# results as data
# ------------------------------------------------------------------------------------------------


def stable(x: Any) -> Any:
    """JSON-ready and diff-stable: floats to ``DIGITS`` significant digits (non-finite -> null), keys as
    strings, tuples as lists."""
    if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
        return x
    if isinstance(x, float):
        return float(f"{x:.{DIGITS}g}") if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): stable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [stable(v) for v in x]
    if hasattr(x, "item"):  # numpy / torch scalars
        return stable(x.item())
    return str(x)


class ClaimData(BaseModel):
    """One claim: ``core.report``'s JSON summary entry (``ClaimResult.to_json`` + text + paper figures)."""

    model_config = ConfigDict(extra="allow")
    index: int
    text: str
    kind: str
    metric: str
    cells: list[str]
    verdict: str
    direction: Optional[str] = None
    test: str = ""
    n: int = 0
    mean_diff: Optional[float] = None
    ci: list[Optional[float]] = Field(default_factory=lambda: [None, None])
    ci_level: Optional[float] = None
    p: Optional[float] = None
    seeds_needed: Optional[int] = None
    paper_figures: dict[str, dict[str, Any]] = Field(default_factory=dict)


class ResultsData(BaseModel):
    """``results/<experiment>.json``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    schema_: int = Field(SCHEMA, alias="schema")
    experiment: str
    file: str  # the experiment file, e.g. experiments/ablate_codebooks.yaml
    study: str  # <experiment>-<config digest>: the study (and config) the numbers come from
    git: dict[str, Any]  # {commit, dirty}
    dataset: dict[str, Any]  # {type, image_size}
    steps: int
    sampler: str
    objective: dict[str, str]
    planned_seeds: Any  # the file's sweep.seeds: a list or {min, max}
    seeds: dict[str, list[int]]  # cell -> seeds that finished
    runs: dict[str, Any]  # {finished, failed, wall_s, busy_s}
    failed: list[dict[str, Any]] = Field(default_factory=list)
    paper: dict[str, Any]  # {source, note, figures, alpha}
    metrics: list[list[Any]]  # [[metric, higher|lower|null], ...]: shown, in order
    cell_order: list[str]
    cells: dict[str, dict[str, dict[str, Optional[float]]]]  # cell -> seed -> metric -> final value
    trial_params: dict[str, dict[str, Any]] = Field(default_factory=dict)  # tpe: trial -> its parameters
    claims: list[ClaimData]
    curves: dict[str, dict[str, dict[str, list[list[Optional[float]]]]]] = Field(default_factory=dict)
    # curves: metric -> cell -> seed -> [[step, value], ...] (evaluations during training, from MLflow)
    grids: dict[str, Any] = Field(default_factory=dict)  # core.reproduce_grids: {recon, samples} -> file, rows


def dumps(data: dict[str, Any]) -> str:
    return json.dumps(stable(data), indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def write_results(data: dict[str, Any], results_dir: Path) -> Path:
    from core import reproduce_grids

    data, images = reproduce_grids.split(data)  # the grid pictures go next to the record
    # the validated, complete form (defaults filled in): never a file the page cannot read, and
    # loading then writing a record gives the same bytes
    text = dumps(ResultsData.model_validate(json.loads(dumps(data))).model_dump(by_alias=True, mode="json"))
    results_dir.mkdir(parents=True, exist_ok=True)
    reproduce_grids.write_images(data, images, results_dir)
    path = results_dir / f"{data['experiment']}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def load_results(results_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Every ``<results_dir>/*.json``, validated, by experiment name."""
    from pydantic import ValidationError

    from core.reproduce_grids import present

    out = {}
    d = Path(results_dir)
    for path in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            model = ResultsData.model_validate(json.loads(path.read_text()))
        except (ValueError, ValidationError) as e:
            raise ConfigError(str(path), f"not a results file: {str(e).splitlines()[0]}") from None
        out[model.experiment] = present(model.model_dump(by_alias=True, mode="json"), d)
    return out


@functools.lru_cache(maxsize=1)
def git_state() -> dict[str, Any]:
    """{commit, dirty} of the code, read once per command (``main`` reads it before writing anything:
    the results files this command rewrites must not make later records say "dirty")."""
    from core.tracking import git_dirty, git_sha

    return {"commit": git_sha(), "dirty": git_dirty()}


def collect(e: Experiment, overrides: list[str]) -> dict[str, Any]:
    """The finished study of ``e`` as a results record (also writes core.report's report under
    ``<out_dir>/../reports``, where the sweep itself writes it)."""
    overrides = [*e.overrides, *overrides]  # a dataset variant's own, then the command's
    from core import report
    from core.config import apply_overrides, read_yaml, validate
    from core.sweep import results, study as st
    file_raw = read_yaml(e.path)
    raw = apply_overrides(file_raw, overrides)
    exp = validate(raw)
    sw = exp.sweep
    reports = Path(exp.train.out_dir).parent / "reports"
    report.write_report(raw, exp, reports, attach=False, file_raw=file_raw, overrides=overrides)
    summary = json.loads((reports / f"{exp.name}.json").read_text())
    study = results.find_study(exp, sw, overrides)
    trials = st.read_trials(study)
    values, failed, timing, seeds = results.collect(trials, sw.sampler)
    paper = exp.paper or report.Paper()
    shown = report.shown_metrics(values, paper, sw.objective.metric)
    if sw.sampler == "grid":
        from core.sweep import cell_label, grid_points

        order = list(dict.fromkeys(cell_label(pt) for pt in grid_points(sw)))
        order = [c for c in order if c in values] + [c for c in values if c not in order]
    else:
        sign = -1 if sw.objective.direction == "maximize" else 1
        order = sorted(values, key=lambda c: sign * report.mean_std(values[c].get(sw.objective.metric, {}))[0])
    cells = {c: {str(s): {} for s in seeds.get(c, [])} for c in values}
    for c, by_metric in values.items():
        for m, per_seed in by_metric.items():
            for s, v in per_seed.items():
                cells[c].setdefault(str(s), {})[m] = v
    params = {f"#{t.number}": t.record.choices for t in trials if sw.sampler == "tpe" and f"#{t.number}" in values}
    data = {
        "schema": SCHEMA, "experiment": exp.name, "file": f"{e.path.parent.name}/{e.path.name}",
        "study": study.study_name, "git": git_state(),
        "dataset": {"type": exp.data.type, "image_size": exp.data.image_size}, "steps": exp.train.steps,
        "sampler": sw.sampler, "objective": {"metric": sw.objective.metric, "direction": sw.objective.direction},
        "planned_seeds": (raw.get("sweep") or {}).get("seeds", [0]), "seeds": seeds,
        "runs": {"finished": timing["runs"], "failed": len(failed), "wall_s": timing["wall_s"], "busy_s": timing["busy_s"]},
        "failed": failed,
        "paper": {"source": paper.source, "note": paper.note, "figures": paper.figures, "alpha": paper.alpha},
        "metrics": [[m, report.metric_direction(m, report.with_declared(paper, exp))] for m in shown],
        "cell_order": order, "cells": cells, "trial_params": params, "claims": summary.get("claims", []),
        "curves": curves(exp, trials, shown),
    }
    from core.reproduce_grids import attach

    return attach(data, trials, sw.sampler)  # reconstruction and sample grids (core.reproduce_grids)


def curves(exp: Any, trials: list[Any], metrics: list[str]) -> dict[str, Any]:
    """metric -> cell -> seed -> [[step, value], ...] from the runs' MLflow histories ({} without tracking)."""
    if not exp.tracking.enabled:
        return {}
    try:
        from mlflow.tracking import MlflowClient

        from core.tracking import resolve_uri

        client = MlflowClient(tracking_uri=resolve_uri(exp.tracking.uri))
        out: dict[str, Any] = {}
        for t in trials:
            if t.state != "COMPLETE":
                continue
            cell = t.record.cell if exp.sweep.sampler == "grid" else f"#{t.number}"
            for seed, run_id in t.record.run_ids.items():
                for m in metrics:
                    points = {h.step: h.value for h in sorted(client.get_metric_history(run_id, m), key=lambda h: h.timestamp)}
                    if points:
                        out.setdefault(m, {}).setdefault(cell, {})[str(seed)] = [[s, points[s]] for s in sorted(points)]
        return out
    except Exception as err:  # noqa: BLE001 - curves are a nicety: the final metrics are the data
        print(f"vtok reproduce: no learning curves for {exp.name} ({type(err).__name__}: {one_line(err)})", file=sys.stderr)
        return {}


# ------------------------------------------------------------------------------------------------
# running the plan
# ------------------------------------------------------------------------------------------------


def run_experiment(e: Experiment, overrides: list[str]) -> int:
    """``python -m core.run <file> [the experiment's overrides] [overrides]`` in this process: its exit status."""
    from core import run

    return run.main([str(e.path), *e.overrides, *overrides])


def progress_text(e: Experiment, data: dict[str, Any] | None) -> str:
    """``12/12 runs done, 0 failed`` from the results record (single runs: from the run directory)."""
    _, planned = shape(e)
    if not e.raw.get("sweep"):
        return f"{1 if teacher_ready(e.run_prefix) else 0}/1 runs done"
    if data is None:
        return f"?/{planned} runs done (no results)"
    done = sum(len(s) for s in data["seeds"].values())
    return f"{done}/{max(planned, done)} runs done, {data['runs']['failed']} failed"


def check_plan(plan: list[tuple[Experiment, str]]) -> None:
    """Every planned paper experiment validates as it will run (a dataset variant with its overrides;
    a base with its ``paper.also_on`` entries), before anything trains. Validated as in planning
    (core.needs): a teacher run the plan trains first is not missing yet."""
    from core.config import apply_overrides, read_yaml, validate
    from core.needs import planning

    with planning():
        for e, _ in plan:
            if e.paper:
                try:
                    validate(apply_overrides(read_yaml(e.path), e.overrides))
                except ConfigError as err:
                    raise ConfigError(e.where, str(err)) from None


def run_plan(plan: list[tuple[Experiment, str]], results_dir: Path, budget_min: float | None = None,
             runner: Callable[[Experiment, list[str]], int] = run_experiment,
             collector: Callable[[Experiment, list[str]], dict[str, Any] | None] = collect,
             clock: Callable[[], float] = time.monotonic) -> int:
    """Run each planned experiment (stop starting new ones once ``budget_min`` is spent); after each
    paper experiment write its results record. Exit status: 0, 1 (an experiment failed), 130 (stopped)."""
    t0, status, failed = clock(), 0, set()  # failed: the run prefixes of failed experiments
    n = len(plan)
    for i, (e, _) in enumerate(plan, 1):
        spent = (clock() - t0) / 60
        if budget_min is not None and spent >= budget_min:
            rest = [x.name for x, _ in plan[i - 1:]]
            print(f"vtok reproduce: the budget of {budget_min:g} min is spent ({spent:.1f} min); not started: "
                  f"{', '.join(rest)}", file=sys.stderr)
            break
        lacking = [w for w in e.teachers if os.path.normpath(w) in failed]
        if lacking:
            print(f"vtok reproduce: [{i}/{n}] {e.name}: skipped, its teacher ({', '.join(lacking)}) failed", file=sys.stderr)
            status = 1
            continue
        overrides = []  # the command's, after the experiment's own (e.overrides: runner and collector add them)
        seeds = (e.raw.get("sweep") or {}).get("seeds")
        if budget_min is not None and isinstance(seeds, dict):  # a seed range stops adding seeds within the budget
            left = min(budget_min - spent, seeds.get("budget_minutes") or math.inf)
            overrides.append(f"sweep.seeds.budget_minutes={max(left, 0.01):.2f}")  # positive, plain decimal YAML
        what, _ = shape(e)
        print(f"vtok reproduce: [{i}/{n}] {e.name} ({e.where}): {what}", file=sys.stderr)
        start = clock()
        data = None
        try:
            code = runner(e, overrides)
            if code in (0, 1) and e.paper:
                try:
                    data = collector(e, overrides)
                    if data is not None:
                        print(f"vtok reproduce: results {write_results(data, results_dir)}", file=sys.stderr)
                except Exception as err:  # noqa: BLE001 - the runs are stored; a later --only run collects them
                    print(f"vtok reproduce: {e.name}: no results record ({type(err).__name__}: {one_line(err)})",
                          file=sys.stderr)
                    code = code or 1
        except KeyboardInterrupt:  # between runs (a run's own Ctrl-C is core.run's exit status 130)
            code = 130
        print(f"vtok reproduce: [{i}/{n}] {e.name}: {progress_text(e, data)}, {(clock() - start) / 60:.1f} min "
              f"(total {(clock() - t0) / 60:.1f} min){'' if code == 0 else f'; exit status {code}'}", file=sys.stderr)
        if code == 130:
            print("vtok reproduce: interrupted; run the same command to resume (finished runs are not repeated)",
                  file=sys.stderr)
            return 130
        if code != 0:
            failed.add(e.run_prefix)
            status = 1
    return status


# ------------------------------------------------------------------------------------------------
# the page
# ------------------------------------------------------------------------------------------------

PAPERS = ("UniTok", "UniWeTok")


def paper_ref(source: str) -> tuple[str, str]:
    """("UniTok", "Table 8") from a paper section's source."""
    m = re.match(r"\s*([A-Za-z][\w-]*)", source or "")
    t = re.search(r"\b(Table|Figure|Fig\.|Sec\.|Section)\s*[\d.]*\d", source or "")
    return (m.group(1) if m else "–"), (t.group(0) if t else "–")


def _num(x: Any, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:+.3g}" if sign else f"{x:.3g}"


def _cell_fmt(values: list[Any]) -> str:
    """mean ± half-width of the 95% t interval over seeds (one seed: the value)."""
    from core.report_plots import interval

    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    m, half = interval(vals)
    digits = 3 if abs(m) < 1 else (2 if abs(m) < 1000 else 0)
    return f"{m:.{digits}f}" if math.isnan(half) else f"{m:.{digits}f} ± {half:.{digits}f}"


ALIASES = {"gfd_refnet": ("gFID",), "gfd_refnet_nocfg": ("gFID",), "gfid": ("gFID",), "linear_probe_top1": ("top-1",)}


def _figures_text(cells: list[str], figures: dict[str, dict[str, Any]], metric: str = "") -> str:
    """The paper's numbers for the claim's cells: the figure matching ``metric`` when there is one, else all."""
    from core.report_plots import paper_key

    key = paper_key(metric, figures) if metric else None
    if key is None:
        key = next((paper_key(a, figures) for a in ALIASES.get(metric, ()) if paper_key(a, figures)), None)

    def show(f: dict[str, Any]) -> str:
        items = [(key, f.get(key))] if key is not None else list(f.items())
        return ", ".join(f"{k} {_fig(v)}" for k, v in items)

    parts = [f"{c}: {show(figures[c])}" for c in cells if figures.get(c)]
    return "; ".join(parts) or "–"


def _fig(v: Any) -> str:
    return "–" if v is None else str(v)


def _dataset(d: dict[str, Any]) -> str:
    return f"{d.get('type', '?')}" + (f" {d['image_size']} px" if d.get("image_size") else "")


def _effect(c: dict[str, Any]) -> str:
    if c.get("mean_diff") is None:
        return "–"
    lo, hi = (c.get("ci") or [None, None])[:2]
    level = c.get("ci_level")
    lvl = "" if level is None or abs(level - 0.95) < 1e-9 else f" ({level:.0%})"
    return f"{_num(c['mean_diff'], True)} [{_num(lo)}, {_num(hi)}]{lvl}"


def _verdict(c: dict[str, Any]) -> str:
    v = c["verdict"]
    if v == NOT_RUN:
        return NOT_RUN
    if v == "inconclusive":
        return f"**inconclusive** (≈{c['seeds_needed']} seeds)" if c.get("seeds_needed") else "**inconclusive**"
    return f"**{v}**"


def _esc(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


@dataclass
class Entry:
    """One experiment on the page: its file's paper section and, once run, its results record."""

    exp: Experiment
    paper: Any  # core.sweep.paper.Paper
    data: dict[str, Any] | None

    @property
    def claims(self) -> list[dict[str, Any]]:
        if self.data is not None:
            return self.data["claims"]
        return [{"index": i, "text": c.text or _claim_words(c), "metric": c.metric, "cells": c.cells(),
                 "verdict": NOT_RUN, "paper_figures": {k: self.paper.figures[k] for k in c.cells() if k in self.paper.figures}}
                for i, c in enumerate(self.paper.claims)]

    @property
    def source(self) -> str:
        return self.data["paper"]["source"] if self.data is not None else self.paper.source

    @property
    def note(self) -> str:
        return self.data["paper"].get("note", "") if self.data is not None else self.paper.note

    @property
    def dataset(self) -> str:
        return _dataset(self.data["dataset"] if self.data else (self.exp.raw.get("data") or {}))

    def sort_key(self) -> tuple[Any, ...]:
        p, _ = paper_ref(self.source)  # a dataset variant right after its base
        return (PAPERS.index(p) if p in PAPERS else len(PAPERS), self.source, self.exp.family, self.exp.base is not None,
                self.exp.name)


def _claim_words(c: Any) -> str:
    from core.report import _claim_text

    return _claim_text(c)


def entries(exps: dict[str, Experiment], data: dict[str, dict[str, Any]]) -> list[Entry]:
    from core.sweep.paper import parse_paper

    out = [Entry(e, parse_paper(e.raw.get("paper")), data.get(e.name)) for e in exps.values() if e.paper]
    return sorted(out, key=Entry.sort_key)


def build_page(exps: dict[str, Experiment], data: dict[str, dict[str, Any]], plots: dict[str, list[tuple[str, str]]] | None = None) -> str:
    """docs/RESULTS.md from the results records (and, for experiments not run, the files' claims)."""
    plots = plots or {}
    ents = entries(exps, data)
    claims = claim_rows(ents)
    verdicts = [c["verdict"] for _, c in claims]
    decided = sum(v in ("holds", "does not hold") for v in verdicts)
    run = sum(en.data is not None for en in ents)
    nvar = sum(en.exp.base is not None for en in ents)
    var = f" ({nvar} of them on another dataset: `paper.also_on`)" if nvar else ""
    lines = [
        "# Results",
        "",
        "Generated by `python -m core.reproduce` from the data in `results/` (one JSON file per experiment: "
        "per-run final metrics, the claims' verdicts, learning curves). `python -m core.reproduce --report-only` "
        "rebuilds this page and its plots from that data without training; `tests/test_reproduce.py` checks "
        "that this page is what it builds. Verdicts are `core.report`'s (see \"Verdicts\" in the README): "
        "a claim holds or does not hold when the 95% interval of the paired per-seed difference lies on one "
        "side; an inconclusive claim gives the seeds that would decide it.",
        "",
        f"{run} of {len(ents)} paper experiments{var} have results; {len(claims)} claims: {decided} decided "
        f"({verdicts.count('holds')} hold, {verdicts.count('does not hold')} do not hold), "
        f"{verdicts.count('inconclusive')} inconclusive, {verdicts.count(NOT_RUN)} not run.",
        "",
        "## Every claim",
        "",
        "| paper | table / figure | claim | metric | paper's numbers | our effect a − b [95% CI] | verdict | dataset | experiment |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for en, c in claims:
        p, t = paper_ref(en.source)
        lines.append("| " + " | ".join([p, t, _esc(c["text"]), c["metric"],
                                          _esc(_figures_text(c["cells"], c.get("paper_figures") or {}, c["metric"])),
                                          _effect(c), _verdict(c), en.dataset, f"[{en.exp.name}](#{en.exp.name})"]) + " |")
    lines += disagreements(ents)
    for en in ents:
        lines += ["", *section(en, plots.get(en.exp.name, []))]
    return "\n".join(lines) + "\n"


def claim_rows(ents: list[Entry]) -> list[tuple[Entry, dict[str, Any]]]:
    """(entry, claim) in table order: per experiment its claims in order, each claim's row on every
    dataset it is judged on (``paper.also_on``) next to each other, the base's dataset first."""
    families: dict[str, list[Entry]] = {}
    for en in ents:
        families.setdefault(en.exp.family, []).append(en)
    rows = []
    for group in families.values():
        keyed = [((c["index"], k), en, c) for k, en in enumerate(group) for c in en.claims]
        rows += [(en, c) for _, en, c in sorted(keyed, key=lambda t: t[0])]
    return rows


def disagreements(ents: list[Entry]) -> list[str]:
    """Under the claim table, when some experiment is judged on several datasets: the claims that
    hold on one dataset and do not hold on another (a finding), or a line saying there are none."""
    by_claim: dict[tuple[str, int], list[tuple[Entry, dict[str, Any]]]] = {}
    for en, c in claim_rows(ents):
        by_claim.setdefault((en.exp.family, c["index"]), []).append((en, c))
    multi = [rows for rows in by_claim.values() if len(rows) > 1]
    if not multi:
        return []
    found, agree = [], 0
    for rows in multi:
        vs = [c["verdict"] for _, c in rows]
        if "holds" in vs and "does not hold" in vs:
            en0, c0 = rows[0]
            p, t = paper_ref(en0.source)
            found.append(f"- {p} {t}: {_esc(c0['text'])} ({c0['metric']}): " + "; ".join(
                f"{_verdict(c)} on {en.dataset} ({_effect(c)}, [{en.exp.name}](#{en.exp.name}))" for en, c in rows))
        elif sum(v in ("holds", "does not hold") for v in vs) > 1:
            agree += 1
    out = ["", "### Datasets disagree", "", f"Claims judged on more than one dataset (`paper.also_on`): {len(multi)}. "
           "Holding on one dataset and not holding on another"]
    if found:
        out[-1] += f" (a finding: the claim depends on the data): {len(found)}."
        out += ["", *found]
    else:
        out[-1] += (f": none (decided on two or more datasets and agreeing: {agree}; not yet decided on two: "
                    f"{len(multi) - agree}).")
    return out


def variant_note(e: Experiment) -> list[str]:
    """A dataset variant's section says whose claims it judges, on what, and how it runs."""
    if e.base is None:
        return []
    import shlex

    cmd = shlex.join(["python", "-m", "core.run", f"{e.path.parent.name}/{e.path.name}", *e.overrides])
    return ["", f"The claims of [{e.base}](#{e.base}) judged on {_dataset(e.raw.get('data') or {})} (its `paper.also_on`; "
            f"everything else, the note above included, is the base's): `{cmd}`."]


def section(en: Entry, plots: list[tuple[str, str]]) -> list[str]:
    e, d = en.exp, en.data
    out = [f"## {e.name}", "", f"`{e.path.parent.name}/{e.path.name}`. Paper: {_esc(en.source) or '–'}."
           + (f" {en.note}" if en.note else "")]
    out += variant_note(e)
    if d is None:  # the plan's cells and dataset, not its seeds or steps: those are tuned often
        out += ["", f"**Not run.** Planned: {cells_text(e)}, {_dataset(e.raw.get('data') or {})}. "
                f"Run it with `python -m core.reproduce --only {e.name}`."]
        if en.claims:
            out += ["", "| claim | metric | paper's numbers |", "|---|---|---|"]
            out += [f"| {_esc(c['text'])} | {c['metric']} | {_esc(_figures_text(c['cells'], c['paper_figures'], c['metric']))} |"
                    for c in en.claims]
        return out
    runs = d["runs"]
    git = d["git"]
    out += ["", f"Data: {_dataset(d['dataset'])}, {d['steps']} steps, {d['sampler']} sampler, planned "
            f"{seeds_text(d['planned_seeds'])}; study `{d['study']}`"
            + (f", commit `{str(git['commit'])[:10]}`{' (uncommitted changes)' if git.get('dirty') else ''}" if git.get("commit") else "")
            + f". Runs: {runs['finished']} finished, {runs['failed']} failed; wall time {runs['wall_s'] / 60:.1f} min "
            f"(sum of run times {runs['busy_s'] / 60:.1f} min)."]
    from core.report_plots import arrow

    metrics = [m for m, _ in d["metrics"]]
    arrows = {m: arrow(dr) for m, dr in d["metrics"]}
    fig_cols = list(dict.fromkeys(k for f in d["paper"]["figures"].values() for k in f))
    head = ["cell", "seeds"] + [f"{m} {arrows[m]}".strip() for m in metrics] + [f"paper: {p}" for p in fig_cols]
    out += ["", "### Cells (mean ± 95% CI over seeds)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in d["cell_order"]:
        per_seed = d["cells"].get(c, {})
        row = [c + (" (" + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                     for k, v in d["trial_params"][c].items()) + ")" if c in d["trial_params"] else ""),
               ", ".join(sorted(per_seed, key=int)) or "–"]
        row += [_cell_fmt([per_seed[s].get(m) for s in per_seed]) for m in metrics]
        row += [_fig(d["paper"]["figures"].get(c, {}).get(p)) for p in fig_cols]
        out.append("| " + " | ".join(_esc(x) for x in row) + " |")
    if d["claims"]:
        out += ["", "### Claims", "", "| claim | metric | verdict | a − b [CI] | test | n | seeds needed |", "|---|---|---|---|---|---|---|"]
        for c in d["claims"]:
            out.append("| " + " | ".join([_esc(c["text"]), c["metric"], _verdict(c), _effect(c), c.get("test") or "–", str(c.get("n", 0)),
                                          str(c["seeds_needed"]) if c.get("seeds_needed") else "–"]) + " |")
    if d["failed"]:
        out += ["", "Failed runs: " + "; ".join(f"{f['cell']} seed {f['seed']}: {f['error']}" for f in d["failed"])]
    if plots:
        out += ["", " ".join(f"![{alt}]({path})" for alt, path in plots)]
    from core.reproduce_grids import page_lines

    return out + page_lines(d)


def draw_plots(data: dict[str, dict[str, Any]], plot_dir: Path, link_base: str) -> dict[str, list[tuple[str, str]]]:
    """``<plot_dir>/<exp>.curves.png`` (mean over seeds per cell at each evaluation) and
    ``<exp>.claims.png`` (per claim: the per-seed differences and the mean with its interval)."""
    if not data:
        return {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[tuple[str, str]]] = {}
    meta = {"Software": None}  # same data, same bytes

    for name, d in sorted(data.items()):
        links = []
        cv = d["curves"]
        if cv:
            ms = [m for m, _ in d["metrics"] if m in cv] or sorted(cv)
            fig, axes = plt.subplots(1, len(ms), figsize=(3.4 * len(ms), 2.8), squeeze=False)
            for ax, m in zip(axes[0], ms):
                for c in d["cell_order"]:
                    runs = cv[m].get(c)
                    if not runs:
                        continue
                    steps = sorted({s for pts in runs.values() for s, _ in pts})
                    mean = [sum(v for pts in runs.values() for s2, v in pts if s2 == s and v is not None)
                            / max(1, sum(1 for pts in runs.values() for s2, v in pts if s2 == s and v is not None)) for s in steps]
                    ax.plot(steps, mean, marker="o", ms=3, label=c)
                ax.set_title(m, fontsize=9)
                ax.set_xlabel("step", fontsize=8)
                ax.tick_params(labelsize=7)
            axes[0][0].legend(fontsize=6)
            fig.tight_layout()
            fig.savefig(plot_dir / f"{name}.curves.png", dpi=80, metadata=meta)
            plt.close(fig)
            links.append(("learning curves", f"{link_base}/{name}.curves.png"))
        cl = [c for c in d["claims"] if c.get("mean_diff") is not None]
        if cl:
            fig, axes = plt.subplots(len(cl), 1, figsize=(6, 1.1 * len(cl) + 0.4), squeeze=False)
            for ax, c in zip(axes[:, 0], cl):
                lo, hi = (c.get("ci") or [None, None])[:2]
                diffs = [v for v in (c.get("diffs") or {}).values() if v is not None]
                ax.axvline(0, color="0.6", lw=0.8)
                if c.get("tolerance"):
                    ax.axvspan(-c["tolerance"], c["tolerance"], color="0.9")
                ax.plot(diffs, [0] * len(diffs), "o", color="0.5", ms=3)
                if lo is not None and hi is not None:
                    ax.errorbar([c["mean_diff"]], [0], xerr=[[c["mean_diff"] - lo], [hi - c["mean_diff"]]], fmt="s", color="C0", capsize=3)
                else:
                    ax.plot([c["mean_diff"]], [0], "s", color="C0")
                ax.set_yticks([])
                ax.set_xlabel(f"a − b ({c['metric']})", fontsize=7)
                ax.set_title(f"{c['text'][:70]} ({c['metric']}): {c['verdict']}", fontsize=7)
                ax.tick_params(labelsize=7)
            fig.tight_layout()
            fig.savefig(plot_dir / f"{name}.claims.png", dpi=80, metadata=meta)
            plt.close(fig)
            links.append(("claims: a − b per seed and its interval", f"{link_base}/{name}.claims.png"))
        out[name] = links
    return out


def write_page(exps: dict[str, Experiment], results_dir: Path, page: Path, plots: bool = True) -> Path:
    data = load_results(results_dir)
    plot_dir = page.parent / "results"
    links = draw_plots(data, plot_dir, "results") if plots else plot_links(data)
    from core.reproduce_grids import copy_images

    copy_images(data, results_dir, plot_dir)
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(build_page(exps, data, links))
    return page


def plot_links(data: dict[str, dict[str, Any]]) -> dict[str, list[tuple[str, str]]]:
    """The links ``draw_plots`` would make, without drawing (the page only needs the names)."""
    out = {}
    for name, d in data.items():
        links = []
        if d["curves"]:
            links.append(("learning curves", f"results/{name}.curves.png"))
        if any(c.get("mean_diff") is not None for c in d["claims"]):
            links.append(("claims: a − b per seed and its interval", f"results/{name}.claims.png"))
        out[name] = links
    return out


def page_text(exp_dir: str | Path, results_dir: str | Path) -> str:
    """What ``--report-only`` writes to the page (plots aside)."""
    data = load_results(results_dir)
    return build_page(discover(exp_dir), data, plot_links(data))


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    from core.cli import OneLineParser
    from core.display import plain

    p = OneLineParser(prog="python -m core.reproduce", description=plain(__doc__.split("\n\n")[0]),
                      epilog="examples: python -m core.reproduce --dry-run; python -m core.reproduce --only ablate_codebooks "
                             "--budget-minutes 30; python -m core.reproduce --report-only")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run exactly these experiments (names or file stems; a paper.also_on dataset variant by its "
                   "own name, e.g. ablate_codebooks_fashion_mnist); their dependencies too")
    p.add_argument("--report-only", action="store_true", help="rebuild the page from the stored results, train nothing")
    p.add_argument("--budget-minutes", type=float, metavar="M", help="start no new experiment after M minutes in total")
    p.add_argument("--dry-run", action="store_true", help="print the plan (experiments, cells, seeds, dependencies) and exit")
    p.add_argument("--experiments-dir", default="experiments", help="where the experiment files are (default: experiments)")
    p.add_argument("--results-dir", default="results", help="where the results records go (default: results)")
    p.add_argument("--page", default="docs/RESULTS.md", help="the page to write; plots go to its directory's results/ "
                   "(default: docs/RESULTS.md)")
    return p


def main(argv: list[str] | None = None) -> int:
    from core.cli import report

    try:
        args = parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        if args.budget_minutes is not None and not (math.isfinite(args.budget_minutes) and args.budget_minutes > 0):
            raise ConfigError("--budget-minutes", f"must be a positive number of minutes, got {args.budget_minutes:g}")
        if args.report_only and (args.only or args.budget_minutes is not None or args.dry_run):
            raise ConfigError("--report-only", "rebuilds the whole page without training: not with --only, "
                              "--budget-minutes or --dry-run")
        exps = discover(args.experiments_dir)
        results_dir, page = Path(args.results_dir), Path(args.page)
        if args.report_only:
            print(f"written: {write_page(exps, results_dir, page)}")
            return 0
        plan = resolve(args.only, exps)
        if args.dry_run:
            print_plan(plan, results_dir, args.budget_minutes)
            return 0
        load_results(results_dir)  # a broken record is an error before hours of training, not after
        check_plan(plan)
        git_state()
        code = run_plan(plan, results_dir, args.budget_minutes)
        print(f"vtok reproduce: page {write_page(exps, results_dir, page)}", file=sys.stderr)
        return code
    except ConfigError as e:
        return report(e)


if __name__ == "__main__":
    sys.exit(main())
