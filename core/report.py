"""``python -m core.report EXP.yaml [key=value ...]``: a sweep's results beside the paper's, and its claims checked.

Reads the sweep's Optuna study (each finished trial carries its runs' final metrics), prints a
markdown report — mean ± std over seeds per cell and metric, the paper's figures beside them, a
verdict per claim — and writes it with a bar plot into the sweep's parent MLflow run (and under
``--out``). The ``paper:`` section of the experiment:

    paper:
      source: UniTok Table 8
      metrics: {zero_shot_top1: higher, fd_refnet: lower}   # ours to show, and which way is better
      figures: {1x16384: {rFID: 1.50, zero-shot: 41.0}, ...} # the paper's numbers per cell
      threshold: 1.0      # |margin| in pooled standard deviations needed for a verdict
      claims:
        - {text: more sub-codebooks help, order: [1x16384, 2x8192, 4x4096, 8x2048], metric: zero_shot_top1}
        - {better: both, than: recon, metric: fd_refnet}
        - {matches: both, with: contrastive, metric: zero_shot_top1, within: 1.0}

Verdicts: the margin is (mean_a - mean_b) / pooled std, signed so that positive favours the
claim. ``better``: holds when margin >= threshold, does not hold when <= -threshold, else
inconclusive. ``order``: every consecutive pair is a ``better`` claim; holds when all hold, does not
hold when any does not. ``matches``: a is not worse than b by more than ``within`` pooled stds.
With fewer than two seeds on a side there is no spread to measure: inconclusive.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.errors import ConfigError

HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
LOWER_IS_BETTER = ("fd", "fid", "lpips", "loss", "mse", "error")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Claim(Strict):
    """One of the paper's claims about our cells (exactly one of better / order / matches)."""

    text: str = ""  # the claim in words (printed)
    metric: str  # our metric the claim is about
    direction: Optional[Literal["higher", "lower"]] = None  # which way is better (default: paper.metrics, else by name)
    better: Optional[str] = None  # cell claimed better ...
    than: Optional[str] = None  # ... than this cell
    order: Optional[list[str]] = None  # cells from worst to best
    matches: Optional[str] = None  # cell claimed to match ...
    with_: Optional[str] = Field(None, alias="with")  # ... this cell (not worse by more than `within`)
    within: float = Field(1.0, ge=0)  # matches: tolerated deficit in pooled stds

    @model_validator(mode="after")
    def _one_kind(self) -> "Claim":
        kinds = [self.better is not None or self.than is not None, self.order is not None,
                 self.matches is not None or self.with_ is not None]
        if sum(kinds) != 1:
            raise ValueError("a claim is exactly one of: better + than, order, matches + with")
        if kinds[0] and (self.better is None or self.than is None):
            raise ValueError("a 'better' claim needs both better and than")
        if kinds[2] and (self.matches is None or self.with_ is None):
            raise ValueError("a 'matches' claim needs both matches and with")
        if kinds[1] and len(self.order or []) < 2:
            raise ValueError("order: at least two cells")
        return self

    def cells(self) -> list[str]:
        return [c for c in (self.better, self.than, self.matches, self.with_, *(self.order or [])) if c is not None]


class Paper(Strict):
    source: str = ""  # e.g. "UniTok Table 8 (arXiv 2502.20321)"
    note: str = ""  # how our setting differs from the paper's
    metrics: dict[str, Literal["higher", "lower"]] = Field(default_factory=dict)  # ours to show -> better direction
    figures: dict[str, dict[str, Union[float, str, None]]] = Field(default_factory=dict)  # cell -> paper metric -> value
    threshold: float = Field(1.0, gt=0)  # pooled stds for a verdict
    claims: list[Claim] = Field(default_factory=list)


def parse_paper(raw: Any) -> Paper:
    try:
        return Paper.model_validate(raw or {})
    except ValidationError as e:
        err = e.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (extra inputs are not permitted)"
        raise ConfigError(".".join(["paper", *(str(p) for p in err["loc"])]), msg[0].lower() + msg[1:]) from None


def check_paper(paper: Paper, labels: list[str]) -> None:
    """Every cell a claim or figure names must be a cell of the sweep."""
    known = ", ".join(labels)
    for i, c in enumerate(paper.claims):
        for name in c.cells():
            if name not in labels:
                raise ConfigError(f"paper.claims.{i}", f"no cell '{name}' in the sweep (cells: {known})")
    for name in paper.figures:
        if name not in labels:
            raise ConfigError(f"paper.figures.{name}", f"no cell '{name}' in the sweep (cells: {known})")


# ------------------------------------------------------------------------------------------------
# statistics and verdicts
# ------------------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def pooled_std(a: list[float], b: list[float]) -> float:
    """sqrt(((n_a - 1) s_a^2 + (n_b - 1) s_b^2) / (n_a + n_b - 2))."""
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        return math.nan
    return math.sqrt(((na - 1) * statistics.variance(a) + (nb - 1) * statistics.variance(b)) / (na + nb - 2))


def margin(a: list[float], b: list[float], higher_better: bool) -> float:
    """(mean a - mean b) / pooled std, positive when a is better; nan without spread (n < 2)."""
    s = pooled_std(a, b)
    if math.isnan(s):
        return math.nan
    diff = (statistics.fmean(a) - statistics.fmean(b)) * (1 if higher_better else -1)
    if s == 0:
        return 0.0 if diff == 0 else math.copysign(math.inf, diff)
    return diff / s


def better_verdict(m: float, threshold: float) -> str:
    if math.isnan(m):
        return INCONCLUSIVE
    if m >= threshold:
        return HOLDS
    if m <= -threshold:
        return FAILS
    return INCONCLUSIVE


def higher_is_better(metric: str, paper: Paper, claim: Claim | None = None) -> bool:
    if claim is not None and claim.direction:
        return claim.direction == "higher"
    if metric in paper.metrics:
        return paper.metrics[metric] == "higher"
    return not any(tag in metric.lower() for tag in LOWER_IS_BETTER)


def judge(claim: Claim, values: dict[str, dict[str, list[float]]], paper: Paper) -> tuple[str, float, str]:
    """(verdict, margin in pooled stds, detail) for one claim; ``values[cell][metric]`` lists seeds."""
    hb = higher_is_better(claim.metric, paper, claim)

    def seeds(cell: str) -> list[float]:
        return values.get(cell, {}).get(claim.metric, [])

    missing = [c for c in claim.cells() if not seeds(c)]
    if missing:
        return INCONCLUSIVE, math.nan, f"no results for {', '.join(missing)}"
    if claim.better is not None:
        m = margin(seeds(claim.better), seeds(claim.than), hb)
        return better_verdict(m, paper.threshold), m, f"{claim.better} vs {claim.than}"
    if claim.matches is not None:
        m = margin(seeds(claim.matches), seeds(claim.with_), hb)
        verdict = INCONCLUSIVE if math.isnan(m) else (HOLDS if m >= -claim.within else FAILS)
        return verdict, m, f"{claim.matches} vs {claim.with_} (tolerance {claim.within:g})"
    pairs = list(zip(claim.order[:-1], claim.order[1:]))
    ms = [margin(seeds(hi), seeds(lo), hb) for lo, hi in pairs]
    verdicts = [better_verdict(m, paper.threshold) for m in ms]
    verdict = FAILS if FAILS in verdicts else (HOLDS if all(v == HOLDS for v in verdicts) else INCONCLUSIVE)
    detail = "; ".join(f"{hi}>{lo}: {_fmt_margin(m)}" for (lo, hi), m in zip(pairs, ms))
    return verdict, min(ms), detail


# ------------------------------------------------------------------------------------------------
# collecting results from the study
# ------------------------------------------------------------------------------------------------


def collect(study: Any, sampler: str) -> tuple[dict[str, dict[str, list[float]]], list[dict[str, Any]], dict[str, Any]]:
    """(values[cell][metric] -> per-seed list, failed trials, timing) from the study's trials."""
    from optuna.trial import TrialState

    from core.sweep import ATTR_CELL, ATTR_ERROR, ATTR_KEY, ATTR_METRICS

    values: dict[str, dict[str, list[float]]] = {}
    failed, starts, ends, busy = [], [], [], 0.0
    done_keys = {t.user_attrs.get(ATTR_KEY) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.COMPLETE:
            label = t.user_attrs.get(ATTR_CELL, str(t.number)) if sampler == "grid" else f"#{t.number}"
            for metrics in (t.user_attrs.get(ATTR_METRICS) or {}).values():
                for k, v in metrics.items():
                    values.setdefault(label, {}).setdefault(k, []).append(float(v))
            if t.datetime_start and t.datetime_complete:
                starts.append(t.datetime_start)
                ends.append(t.datetime_complete)
                busy += (t.datetime_complete - t.datetime_start).total_seconds()
        elif (t.state == TrialState.FAIL and t.user_attrs.get(ATTR_KEY) not in done_keys
              and not str(t.user_attrs.get(ATTR_ERROR, "")).startswith("duplicate of trial")):
            failed.append({"trial": t.number, "cell": t.user_attrs.get(ATTR_CELL, "?"), "seed": t.params.get("seed"),
                           "error": t.user_attrs.get(ATTR_ERROR, "")})
    wall = (max(ends) - min(starts)).total_seconds() if starts else 0.0
    return values, failed, {"wall_s": wall, "busy_s": busy, "runs": len(starts)}


# ------------------------------------------------------------------------------------------------
# rendering
# ------------------------------------------------------------------------------------------------


def _fmt(m: float, s: float) -> str:
    if math.isnan(m):
        return "–"
    digits = 3 if abs(m) < 1 else (2 if abs(m) < 1000 else 0)
    return f"{m:.{digits}f}" if math.isnan(s) else f"{m:.{digits}f} ± {s:.{digits}f}"


def _fmt_margin(m: float) -> str:
    return "n/a" if math.isnan(m) else (f"{m:+.1f}" if math.isfinite(m) else ("+inf" if m > 0 else "-inf"))


def shown_metrics(values: dict[str, dict[str, list[float]]], paper: Paper, objective: str | None) -> list[str]:
    if paper.metrics:
        names = list(paper.metrics)
    else:
        names = sorted({k for cell in values.values() for k in cell if not k.startswith("linear_probe_fit")})
    if objective and objective not in names:
        names.insert(0, objective)
    return names


def render(title: str, paper: Paper, values: dict[str, dict[str, list[float]]], order: list[str], failed: list[dict[str, Any]],
           timing: dict[str, Any], header: str = "", objective: str | None = None) -> tuple[str, list[tuple[Claim, str, float, str]]]:
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
    lines += ["", "## Results (mean ± std over seeds)", ""]
    arrows = {m: ("↑" if higher_is_better(m, paper) else "↓") for m in metrics}
    head = ["cell", "seeds"] + [f"{m} {arrows[m]}" for m in metrics] + [f"paper: {p}" for p in paper_cols]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cells:
        n = max((len(v) for v in values[c].values()), default=0)
        row = [c, str(n)] + [_fmt(*mean_std(values[c].get(m, []))) for m in metrics]
        row += [_paper_value(paper.figures.get(c, {}).get(p)) for p in paper_cols]
        lines.append("| " + " | ".join(row) + " |")
    for c in paper.figures:
        if c not in values:
            lines.append("| " + " | ".join([c, "0"] + ["–"] * len(metrics) + [_paper_value(paper.figures[c].get(p)) for p in paper_cols]) + " |")
    verdicts = []
    if paper.claims:
        lines += ["", f"## Claims (margin in pooled standard deviations; a verdict needs |margin| ≥ {paper.threshold:g})", "",
                  "| claim | metric | verdict | margin | detail |", "|---|---|---|---|---|"]
        for claim in paper.claims:
            verdict, m, detail = judge(claim, values, paper)
            verdicts.append((claim, verdict, m, detail))
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


def plot(values: dict[str, dict[str, list[float]]], cells: list[str], metrics: list[str], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in metrics if any(values.get(c, {}).get(m) for c in cells)] or ["(none)"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(4.0, 3.2 * len(metrics)), 3.4), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        stats = [mean_std(values.get(c, {}).get(m, [])) for c in cells]
        ax.bar(range(len(cells)), [s[0] for s in stats], yerr=[0 if math.isnan(s[1]) else s[1] for s in stats], capsize=3)
        ax.set_xticks(range(len(cells)), cells, rotation=45, ha="right", fontsize=7)
        ax.set_title(m, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------------


def build_report(raw: dict[str, Any], exp: Any) -> tuple[str, dict[str, Any]]:
    """The markdown report and what ``main`` needs to store it (values, cells, parent run id)."""
    from core import sweep

    if not exp.sweep:
        raise ConfigError("sweep", f"experiment '{exp.name}' has no sweep section: nothing to report")
    sw = sweep.parse_sweep(exp.sweep)
    paper = parse_paper(exp.paper)
    order = list(dict.fromkeys(sweep.cell_label(pt) for pt in sweep.grid_points(sw))) if sw.sampler == "grid" else []
    if sw.sampler == "grid":
        check_paper(paper, order)
    url = sw.storage_url()
    if "://" not in url and not Path(url).is_file():
        raise ConfigError("sweep.storage", f"no study storage at {Path(url).resolve()}: run the sweep first "
                          "(python -m core.run EXP.yaml), from the same working directory")
    try:
        study = sweep.open_study(exp, sw, create=False)
    except KeyError:
        raise ConfigError("sweep.study_name", f"no study '{sweep.study_name(exp, sw)}' in {sweep._display_storage(sw.storage_url())}: "
                          "run the sweep first (python -m core.run EXP.yaml)") from None
    values, failed, timing = collect(study, sw.sampler)
    if sw.sampler == "tpe":  # best trials first
        sign = -1 if sw.objective.direction == "maximize" else 1
        order = sorted(values, key=lambda c: sign * mean_std(values[c].get(sw.objective.metric, []))[0])
    header = (f"Study `{study.study_name}` in {sweep._display_storage(sw.storage_url())}; sampler {sw.sampler}, "
              f"seeds {sw.seeds}; objective {sw.objective.direction} {sw.objective.metric}.")
    if sw.sampler == "tpe":  # what each trial row tried
        params = {f"#{t.number}": t.params for t in study.get_trials(deepcopy=False) if f"#{t.number}" in values}
        header += "\n\n" + "\n".join(f"- {c}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                          for k, v in params[c].items()) for c in order)
    md, verdicts = render(exp.name, paper, values, order, failed, timing, header, sw.objective.metric)
    parent = study.user_attrs.get(sweep.STUDY_PARENT)
    return md, {"values": values, "order": order, "paper": paper, "parent": parent, "verdicts": verdicts,
                "metrics": shown_metrics(values, paper, sw.objective.metric)}


def main(argv: list[str] | None = None) -> int:
    from core.cli import OneLineParser

    p = OneLineParser(prog="python -m core.report", description=__doc__.splitlines()[0])
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
        from core.config import apply_overrides, read_yaml, validate

        check_directory(args.out, "--out")

        raw = apply_overrides(read_yaml(args.experiment), args.overrides)
        exp = validate(raw)
        md, info = build_report(raw, exp)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md_path = out / f"{exp.name}.md"
    md_path.write_text(md)
    png = plot(info["values"], info["order"], info["metrics"], out / f"{exp.name}.png", exp.name)
    if info["parent"] and exp.tracking.enabled and not args.no_mlflow:
        from mlflow.tracking import MlflowClient

        from core.tracking import resolve_uri

        client = MlflowClient(tracking_uri=resolve_uri(exp.tracking.uri))
        client.log_artifact(info["parent"], str(md_path), "report")
        client.log_artifact(info["parent"], str(png), "report")
        for i, (claim, verdict, m, _) in enumerate(info["verdicts"]):
            client.set_tag(info["parent"], f"vtok.claim.{i}", f"{verdict} ({_fmt_margin(m)}): {claim.text or _claim_text(claim)}")
    attached = info["parent"] and exp.tracking.enabled and not args.no_mlflow
    print(f"written: {md_path}, {png}" + (f"; attached to MLflow run {info['parent']}" if attached else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
