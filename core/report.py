"""``python -m core.report EXP.yaml [key=value ...]``: a sweep's results beside the paper's, and its claims checked.

Reads the sweep's Optuna study (each finished trial carries its runs' final metrics), prints a
markdown report — per cell and metric the mean over seeds with its 95% t-interval (``cell_interval``),
the paper's figures beside them, a verdict per claim — and writes it with a bar plot into the sweep's parent MLflow run (and under
``--out``). The ``paper:`` section of the experiment:

    paper:
      source: UniTok Table 8
      metrics: {zero_shot_top1: higher, fd_refnet: lower}   # ours to show, and which way is better
      figures: {1x16384: {rFID: 1.50, zero-shot: 41.0}, ...} # the paper's numbers per cell
      alpha: 0.05         # error rate of a verdict (two-sided)
      claims:
        - {text: more sub-codebooks help, order: [1x16384, 2x8192, 4x4096, 8x2048], metric: zero_shot_top1}
        - {better: both, than: recon, metric: fd_refnet}
        - {matches: both, with: contrastive, metric: zero_shot_top1, tolerance: 0.5}  # metric units

Verdicts (``core.stats``): a claim is judged on the per-seed differences metric(a, s) - metric(b, s)
over the seeds both cells ran (paired t; Welch's t when they share fewer than two seeds), with the
mean difference in the metric's units, its 95% interval and a p-value. ``better``: holds when the
interval lies on the claimed side of 0, does not hold when on the other, else inconclusive.
``order``: every neighbouring pair a ``better`` claim, Holm-corrected. ``matches``: equivalence
within ±``tolerance`` by two one-sided tests (no tolerance: ``within`` pooled seed standard
deviations, estimated from the seeds, and the detail says so). A sweep with a seed range is judged
with the group-sequential design of ``core.stats`` (repeated intervals, valid at every look).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from core import stats
from core.display import plain as _plain
from core.errors import ConfigError
from core.stats import FAILS, HOLDS, INCONCLUSIVE  # noqa: F401 (the verdicts, re-exported)
from core.sweep.paper import Claim, Paper, check_paper, parse_paper  # noqa: F401 - the report's models



# ------------------------------------------------------------------------------------------------
# statistics and verdicts
# ------------------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float]:
    values = list(values.values()) if isinstance(values, dict) else values  # {seed: value}
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def pooled_std(a: list[float], b: list[float]) -> float:
    """sqrt(((n_a - 1) s_a^2 + (n_b - 1) s_b^2) / (n_a + n_b - 2))."""
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        return math.nan
    return math.sqrt(((na - 1) * statistics.variance(a) + (nb - 1) * statistics.variance(b)) / (na + nb - 2))


def metric_direction(metric: str, paper: Paper, claim: Claim | None = None) -> str | None:
    """'higher' / 'lower' / None: the claim's, else paper.metrics', else the evaluators' declaration
    (when the experiment validated here, see :func:`with_declared`), else -- a stored view, an
    undeclared metric -- the fallback table in core.report_plots."""
    from core.evaluation import direction_of
    from core.report_plots import direction

    if claim is not None and claim.direction:
        return claim.direction
    if metric in paper.metrics:
        return paper.metrics[metric]
    if paper._declared is not None:
        found, d = direction_of(metric, paper._declared)
        if found:
            return d
    return direction(metric)


def with_declared(paper: Paper, exp: Any, cells: list[Any] | None = None) -> Paper:
    """``paper`` carrying the declared metric directions of the evaluators of ``exp`` and of the
    sweep's validated ``cells`` (nothing for a stored view, which has no validated evaluators)."""
    if getattr(exp, "stored", False) or not hasattr(exp, "eval"):
        return paper
    from core.evaluation import declared_metrics
    from core.plugins import get_registry

    declared: dict[str, Any] | None = {}
    for e in [exp, *(cells or [])]:
        d = declared_metrics(e, get_registry())
        if d is None:
            declared = None
            break
        declared.update(d)
    paper = paper.model_copy()
    paper._declared = declared
    return paper


def higher_is_better(metric: str, paper: Paper, claim: Claim | None = None) -> bool:
    return metric_direction(metric, paper, claim) != "lower"


def judge_claim(claim: Claim, values: dict[str, dict[str, Any]], paper: Paper,
                design: stats.Design | None = None) -> stats.ClaimResult:
    """One claim judged by ``core.stats``; ``values[cell][metric]`` is {seed: value} (paired) or a list."""
    hb = higher_is_better(claim.metric, paper, claim)
    kw = dict(design=design, alpha=paper.alpha, statement=claim.text or _claim_text(claim), metric=claim.metric)

    def seeds(cell: str) -> Any:
        return values.get(cell, {}).get(claim.metric, [])

    if claim.better is not None:
        return stats.better(seeds(claim.better), seeds(claim.than), higher_is_better=hb, cells=(claim.better, claim.than), **kw)
    if claim.matches is not None:
        a, b = seeds(claim.matches), seeds(claim.with_)
        tol, note = claim.tolerance, ""
        if tol is None:
            tol = claim.within * pooled_std(*(list(v.values()) if isinstance(v, dict) else list(v) for v in (a, b)))
            note = f"no tolerance declared: {claim.within:g} pooled seed std = {tol:.3g}, estimated from these seeds"
        return stats.matches(a, b, tol, direction="higher" if hb else "lower", cells=(claim.matches, claim.with_),
                             note=note, **kw)
    return stats.order([seeds(c) for c in claim.order], higher_is_better=hb, cells=claim.order, **kw)


def judge(claim: Claim, values: dict[str, dict[str, Any]], paper: Paper,
          design: stats.Design | None = None) -> tuple[str, float, str]:
    """(verdict, mean difference a - b in the metric's units, detail) for one claim."""
    res = judge_claim(claim, values, paper, design)
    return res.verdict, res.mean_diff, res.detail()


# ------------------------------------------------------------------------------------------------
# collecting results from the study
# ------------------------------------------------------------------------------------------------


def collect(study: Any, sampler: str) -> tuple[dict[str, dict[str, list[float]]], list[dict[str, Any]], dict[str, Any]]:
    """(values[cell][metric] -> per-seed list, failed trials, timing) from the study's trial records."""
    from core.sweep import results, study as st

    values, failed, timing, _ = results.collect(st.read_trials(study), sampler)
    return values, failed, timing


# ------------------------------------------------------------------------------------------------
# rendering
# ------------------------------------------------------------------------------------------------


def cell_interval(values: Any, alpha: float = stats.ALPHA) -> dict[str, Any]:
    """A cell's metric over its seeds: mean, the (1 - alpha) Student-t interval of the mean
    (mean ± t_{n-1}(1 - alpha/2) s / sqrt(n); no interval from one seed) and n, as plain JSON."""
    m, lo, hi = stats.mean_interval(values, alpha)
    n = len(values)
    return stats._clean({"mean": m, "ci": [lo, hi], "ci_level": 1.0 - alpha, "n": n})


def cells_json(values: dict[str, dict[str, Any]], order: list[str], alpha: float = stats.ALPHA) -> dict[str, Any]:
    """``{cell: {metric: cell_interval}}`` for every cell and metric, in the report's order."""
    cells = [c for c in order if c in values] + [c for c in values if c not in order]
    return {c: {m: cell_interval(v, alpha) for m, v in values[c].items() if len(v)} for c in cells}


def _fmt(m: float, s: float) -> str:
    """``mean ± s`` (s: the interval's half-width), digits by the mean's magnitude."""
    if math.isnan(m):
        return "–"
    digits = 3 if abs(m) < 1 else (2 if abs(m) < 1000 else 0)
    return f"{m:.{digits}f}" if math.isnan(s) else f"{m:.{digits}f} ± {s:.{digits}f}"


def _fmt_interval(values: Any, alpha: float) -> str:
    m, lo, hi = stats.mean_interval(values, alpha) if len(values) else (math.nan, math.nan, math.nan)
    return _fmt(m, hi - m)


def _fmt_margin(m: float) -> str:
    return "n/a" if math.isnan(m) else (f"{m:+.3g}" if math.isfinite(m) else ("+inf" if m > 0 else "-inf"))


def shown_metrics(values: dict[str, dict[str, list[float]]], paper: Paper, objective: str | None) -> list[str]:
    from core.report_plots import default_metrics

    if not paper.metrics:  # a readable default subset, not every metric the evaluators emit
        return default_metrics(values, objective, [c.metric for c in paper.claims])
    names = list(paper.metrics)
    if objective and objective not in names:
        names.insert(0, objective)
    return names


def render(title: str, paper: Paper, values: dict[str, dict[str, list[float]]], order: list[str], failed: list[dict[str, Any]],
           timing: dict[str, Any], header: str = "", objective: str | None = None,
           design: stats.Design | None = None) -> tuple[str, list[tuple[Claim, str, float, str, stats.ClaimResult]]]:
    cells = [c for c in order if c in values] + [c for c in values if c not in order]
    metrics = shown_metrics(values, paper, objective)
    paper_cols = list(dict.fromkeys(k for f in paper.figures.values() for k in f))
    lines = [f"# {title}", ""]
    if paper.source:
        lines.append(f"Paper: {paper.source}." + (f" {paper.note}" if paper.note else ""))
    if header:
        lines.append(header)
    lines.append(f"Runs: {timing['runs']} finished, {len(failed)} failed; wall time {timing['wall_s'] / 60:.1f} min "
                 f"(sum of run times {timing['busy_s'] / 60:.1f} min).")
    level = f"{1.0 - paper.alpha:.0%}"
    lines += ["", f"## Results (mean over seeds ± half-width of its {level} confidence interval: Student t with "
              "n − 1 degrees of freedom; one seed: the value alone)", ""]
    from core.report_plots import arrow

    arrows = {m: arrow(metric_direction(m, paper)) for m in metrics}
    head = ["cell", "seeds"] + [f"{m} {arrows[m]}".strip() for m in metrics] + [f"paper: {p}" for p in paper_cols]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cells:
        n = max((len(v) for v in values[c].values()), default=0)
        row = [c, str(n)] + [_fmt_interval(values[c].get(m, []), paper.alpha) for m in metrics]
        row += [_paper_value(paper.figures.get(c, {}).get(p)) for p in paper_cols]
        lines.append("| " + " | ".join(row) + " |")
    for c in paper.figures:
        if c not in values:
            lines.append("| " + " | ".join([c, "0"] + ["–"] * len(metrics) + [_paper_value(paper.figures[c].get(p)) for p in paper_cols]) + " |")
    verdicts = []
    if paper.claims:
        lines += ["", f"## Claims (a − b: mean difference in the metric's units; verdicts at error rate {paper.alpha:g})", "",
                  "| claim | metric | verdict | a − b | detail |", "|---|---|---|---|---|"]
        for claim in paper.claims:
            res = judge_claim(claim, values, paper, design)
            verdict, m, detail = res.verdict, res.mean_diff, res.detail()
            verdicts.append((claim, verdict, m, detail, res))
            text = claim.text or _claim_text(claim)
            lines.append(f"| {text} | {claim.metric} | **{verdict}** | {_fmt_margin(m)} | {detail} |")
    if failed:
        lines += ["", "## Failed runs", ""]
        lines += [f"- trial {f['trial']}: {f['cell']} seed {f['seed']}: {f['error']}" for f in failed]
    return "\n".join(lines) + "\n", verdicts


def _paper_value(v: Any) -> str:
    return "–" if v is None else str(v)


def _claim_text(c: Claim) -> str:
    if c.better is not None:
        return f"{c.better} better than {c.than}"
    if c.matches is not None:
        return f"{c.matches} matches {c.with_}"
    return " < ".join(c.order or [])


def plot(values: dict[str, dict[str, list[float]]], cells: list[str], metrics: list[str], path: Path, title: str,
         paper: Paper | None = None) -> Path:
    from core import report_plots

    paper = paper or Paper()
    return report_plots.plot(values, cells, metrics, path, title, paper.figures,
                             {m: metric_direction(m, paper) for m in metrics})


def write_claims(info: dict[str, Any], out: Path, name: str) -> tuple[Path, list[Path]]:
    """``<out>/<name>.json``: every claim's verdict and numbers (``ClaimResult.to_json()`` plus the
    claim's text and the paper's figures of its cells) and every cell's metrics (``cells``: mean,
    (1 - alpha) t-interval, n per metric), for a whole-project results page; and one
    plot per claim, ``<name>.claim<i>.png`` (paired differences per seed with the interval)."""
    import json

    from core import report_plots

    paper = info["paper"]
    claims, pngs = [], []
    for i, (claim, *_, res) in enumerate(info["verdicts"]):
        entry = {"index": i, "text": claim.text or _claim_text(claim), **res.to_json(),
                 "paper_figures": {c: paper.figures[c] for c in res.cells if c in paper.figures}}
        claims.append(entry)
        pngs.append(report_plots.claim_plot(res, out / f"{name}.claim{i}.png"))
    doc = {"experiment": name, "study": info.get("study"), "source": paper.source, "alpha": paper.alpha,
           "seeds": info.get("seeds", {}), "claims": claims,
           "cells": cells_json(info.get("values", {}), info.get("order", []), paper.alpha)}
    path = out / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2, sort_keys=False, default=str) + "\n")
    return path, pngs


# ------------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------------


def build_report(raw: dict[str, Any], exp: Any, file_raw: dict[str, Any] | None = None,
                 overrides: list[str] | None = None) -> tuple[str, dict[str, Any]]:
    """The markdown report and what ``main`` needs to store it (values, cells, parent run id).
    ``file_raw``: the experiment file as read, to state what the command line changed."""
    from core import sweep
    from core.sweep import results, study as st

    if not exp.sweep:
        raise ConfigError("sweep", f"experiment '{exp.name}' has no sweep section: nothing to report")
    sw = exp.sweep
    cells = [] if getattr(exp, "stored", False) else [c for _, c in sweep.checked_points(raw, sw)]
    paper = with_declared(exp.paper or Paper(), exp, cells)
    order = list(dict.fromkeys(sweep.cell_label(pt) for pt in sweep.grid_points(sw))) if sw.sampler == "grid" else []
    study = results.load_named(sw) if getattr(exp, "stored", False) else results.find_study(exp, sw, overrides or [])
    trials = st.read_trials(study)
    values, failed, timing, seeds = results.collect(trials, sw.sampler)
    if sw.sampler == "tpe":  # best trials first
        sign = -1 if sw.objective.direction == "maximize" else 1
        order = sorted(values, key=lambda c: sign * mean_std(values[c].get(sw.objective.metric, []))[0])
    planned = (f"seeds {sw.seed_range.min} to {sw.seed_range.max} per cell until the claims are decided"
               if sw.seed_range is not None else f"planned seeds {sw.seeds}")
    header = (f"Study `{study.study_name}` in {st.display_storage(sw.storage_url())}; sampler {sw.sampler}, "
              f"{planned}; objective {sw.objective.direction} {sw.objective.metric}.")
    changes = results.config_changes(file_raw, raw) if file_raw is not None else []
    header += "\n\nConfig: " + (f"the experiment file with {', '.join(f'`{c}`' for c in changes)}." if changes
                                else "the experiment file as it is.")
    header += "\n\n" + results.seeds_line([c for c in order if c in values] + [c for c in values if c not in order],
                                          seeds, sw.seeds, sw.seed_range.max if sw.seed_range is not None else None)
    if sw.sampler == "tpe":  # what each trial row tried
        params = {f"#{t.number}": t.record.choices for t in trials if f"#{t.number}" in values}
        header += "\n\n" + "\n".join(f"- {c}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                          for k, v in params[c].items()) for c in order)
    md, verdicts = render(exp.name, paper, values, order, failed, timing, header, sw.objective.metric,
                          design=stats.design_for(sw.seed_range or sw.seeds))
    parent = study.user_attrs.get(st.PARENT_RUN)
    return md, {"study": study.study_name, "values": values, "order": order, "paper": paper, "parent": parent, "verdicts": verdicts,
                "metrics": shown_metrics(values, paper, sw.objective.metric), "seeds": seeds, "changes": changes}


def report_view(raw: dict[str, Any]) -> Any:
    """The validated experiment when this machine can validate it. When it cannot only because a
    plugin the sweep used is no longer installed, the stored view: the study named by
    ``sweep.study_name``, or else the experiment's only study in the storage (several: one error
    listing them). Any other config error stays an error (a typo must not report another study)."""
    import re

    from core.config import validate

    try:
        return validate(raw)
    except ConfigError as e:
        if not re.search(r"unknown \w+ '[^']*' \(registered", str(e)):
            raise
        view = stored_view(raw)
        if view.sweep is None:
            raise
        if not view.sweep.study_name:
            from core.sweep import study as st

            st.check_storage(view.sweep.storage_url(), must_exist=True)
            names = [n for n, _ in st.studies_like(view, view.sweep)]
            if len(names) != 1:
                raise ConfigError("sweep.study_name", f"{e.message}; with that plugin missing the study cannot be "
                                  "identified from the config: name it with sweep.study_name=<name>"
                                  + (f" (studies of '{view.name}': {', '.join(names)})" if names else "")) from None
            view.sweep = view.sweep.model_copy(update={"study_name": names[0]})
        print(f"vtok report: the config does not validate here ({e}); reporting the stored study "
              f"'{view.sweep.study_name}' as it was recorded", file=sys.stderr)
        return view


def stored_view(raw: dict[str, Any]) -> Any:
    """What a report needs from the experiment file (name, sweep, paper, tracking), read without
    validating the plugin configs: a finished study stays reportable after a plugin is uninstalled.
    ``stored`` marks it: the study is then found by its recorded name, not by the config's identity."""
    from types import SimpleNamespace

    from pydantic import TypeAdapter, ValidationError

    from core.config import TrackingConfig
    from core.sweep.paper import parse_paper
    from core.sweep.space import parse_sweep

    name = raw.get("name", "experiment")
    if not isinstance(name, str) or not name:
        raise ConfigError("name", "a non-empty string is required")
    try:
        tracking = TypeAdapter(TrackingConfig).validate_python(raw.get("tracking") or {})
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigError(".".join(["tracking", *(str(p) for p in err["loc"])]), err["msg"]) from None
    sweep = parse_sweep(raw["sweep"]) if raw.get("sweep") else None
    return SimpleNamespace(name=name, sweep=sweep, paper=parse_paper(raw.get("paper")), tracking=tracking, stored=True)


def write_report(raw: dict[str, Any], exp: Any, out_dir: str | Path = "reports", attach: bool = True,
                 file_raw: dict[str, Any] | None = None, overrides: list[str] | None = None) -> tuple[str, Path, Path, str | None]:
    """Build the report, write ``<out>/<name>.md`` and ``.png``, the claims' JSON summary
    (``<name>.json``) and a plot per claim (``<name>.claim<i>.png``, ``write_claims``), and (``attach``)
    put them, the claims' verdicts and the per-cell means on the sweep's parent MLflow run. Returns (markdown, md path,
    png path, the parent run id it was attached to or None)."""
    md, info = build_report(raw, exp, file_raw, overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md_path = out / f"{exp.name}.md"
    md_path.write_text(md)
    png = plot(info["values"], info["order"], info["metrics"], out / f"{exp.name}.png", exp.name, info["paper"])
    summary, claim_pngs = write_claims(info, out, exp.name)
    attached = None
    if info["parent"] and exp.tracking.enabled and attach:
        from mlflow.tracking import MlflowClient

        from core.tracking import log_summary, resolve_uri

        client = MlflowClient(tracking_uri=resolve_uri(exp.tracking.uri))
        client.log_artifact(info["parent"], str(md_path), "report")
        client.log_artifact(info["parent"], str(png), "report")
        for extra in [summary, *claim_pngs]:
            client.log_artifact(info["parent"], str(extra), "report")
        for i, (claim, verdict, m, *_) in enumerate(info["verdicts"]):
            client.set_tag(info["parent"], f"vtok.claim.{i}", f"{verdict} ({_fmt_margin(m)}): {claim.text or _claim_text(claim)}")
        log_summary(client, info["parent"], info["values"], info["metrics"], info["order"])
        attached = info["parent"]
    return md, md_path, png, attached


def main(argv: list[str] | None = None) -> int:
    from core.cli import OneLineParser

    p = OneLineParser(prog="python -m core.report", description=_plain(__doc__.split("\n\n")[0]))
    p.add_argument("experiment", help="the sweep's experiment YAML file")
    p.add_argument("overrides", nargs="*", help="the same dotted key=value overrides the sweep ran with")
    p.add_argument("--out", default="reports", help="directory for <name>.md and <name>.png (default: reports)")
    p.add_argument("--no-mlflow", action="store_true", help="do not attach the report to the parent MLflow run")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:  # a bad command line: one line printed already
        return int(e.code or 0)
    try:
        from core.boundary import check_directory
        from core.config import apply_overrides, read_yaml

        check_directory(args.out, "--out")
        file_raw = read_yaml(args.experiment)
        raw = apply_overrides(file_raw, args.overrides)
        exp = report_view(raw)
        md, md_path, png, attached = write_report(raw, exp, args.out, attach=not args.no_mlflow,
                                                  file_raw=file_raw, overrides=args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(md)
    print(f"written: {md_path}, {png}" + (f"; attached to MLflow run {attached}" if attached else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
