"""The experiment's ``paper:`` section (typed) and the checks that tie it and the sweep to the cells.

``check_study`` runs inside ``core.config.validate`` (the same single pass as the rest of the
experiment): every cell validates, every cell a claim or figure names exists, and every metric the
objective, a claim or ``paper.metrics`` names is one the cells' evaluators can produce.
"""
from __future__ import annotations

import re
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from core.errors import ConfigError
from core.interfaces import VocabModel
from core.stats import ALPHA


class Strict(VocabModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Claim(Strict):
    """One of the paper's claims about our cells (exactly one of better / order / matches)."""

    text: str = ""  # the claim in words (printed)
    metric: str  # our metric the claim is about
    direction: Optional[Literal["higher", "lower"]] = None  # which way is better (default: paper.metrics, else the evaluators' declaration)
    better: Optional[str] = None  # cell claimed better ...
    than: Optional[str] = None  # ... than this cell
    order: Optional[list[str]] = None  # cells from worst to best
    matches: Optional[str] = None  # cell claimed to match ...
    with_: Optional[str] = Field(None, alias="with")  # ... this cell (equal within ±tolerance)
    tolerance: Optional[float] = Field(None, gt=0)  # matches: equivalence margin in the metric's units (TOST)
    within: float = Field(1.0, gt=0)  # matches without tolerance: margin in pooled seed stds (estimated)

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
    """What the experiment reproduces: the paper's numbers beside ours and the claims to decide.

    ``also_on`` lists further datasets (each a ``data:`` mapping, e.g. ``{type: fashion_mnist,
    image_size: 32}``) on which ``python -m core.reproduce`` judges the same claims: the file runs
    once more per entry as the experiment ``<name>_<dataset type>`` (overrides ``name=...``,
    ``data=<the mapping>``, ``paper.also_on=[]``; see ``variant_overrides``), its own study and
    results record. Each entry is validated with the experiment (the whole config on that dataset).
    """

    source: str = ""  # e.g. "UniTok Table 8 (arXiv 2502.20321)"
    note: str = ""  # how our setting differs from the paper's
    metrics: dict[str, Literal["higher", "lower"]] = Field(default_factory=dict)  # ours to show -> better direction
    figures: dict[str, dict[str, Union[float, str, None]]] = Field(default_factory=dict)  # cell -> paper metric -> value
    alpha: float = Field(ALPHA, gt=0, lt=0.5)  # error rate of a verdict (two-sided)
    claims: list[Claim] = Field(default_factory=list)
    also_on: list[dict[str, Any]] = Field(default_factory=list)  # more datasets to judge the claims on (core.reproduce)
    # the evaluators' declared directions (set by the report when the experiment validates here)
    _declared: Optional[dict[str, Optional[str]]] = PrivateAttr(default=None)


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


def variant_name(name: str, data: dict[str, Any]) -> str:
    """The experiment ``name`` judged on the dataset ``data`` (an entry of ``paper.also_on``):
    ``<name>_<dataset type>``, e.g. ``ablate_codebooks_fashion_mnist``."""
    return f"{name}_{data.get('type')}"


def variant_overrides(name: str, data: dict[str, Any]) -> list[str]:
    """The ``key=value`` overrides that run the experiment ``name`` on the dataset ``data``: its own
    name (so its own run directories, study and results file), that dataset, no further variants."""
    import yaml

    flow = yaml.safe_dump(data, default_flow_style=True, sort_keys=False, width=float("inf"), allow_unicode=True).strip()
    return [f"name={variant_name(name, data)}", f"data={flow}", "paper.also_on=[]"]


def check_variant_types(name: str, own_type: Any, entries: list[dict[str, Any]]) -> None:
    """One ``paper.also_on`` entry per dataset type (the type names the variant), none the experiment's own."""
    seen = {own_type: "the experiment's own dataset"}
    for i, entry in enumerate(entries):
        kind = entry.get("type")
        if not isinstance(kind, str):
            continue  # validation names what is missing
        if kind in seen:
            raise ConfigError(f"paper.also_on.{i}.type", f"'{kind}' is {seen[kind]}: each entry is another dataset type "
                              f"(it names the variant, {variant_name(name, entry)})")
        seen[kind] = f"already paper.also_on.{i}"


def check_also_on(raw: dict[str, Any], exp: Any, reg: Any) -> None:
    """Every ``paper.also_on`` entry: one dataset type each (it names the variant), not the
    experiment's own, and the whole experiment validates on it (re-rooted errors:
    ``paper.also_on.0.image_size: ...``, ``paper.also_on.0: on <type>: eval.2: ...``)."""
    from core.config import apply_overrides, validate

    paper = exp.paper
    if paper is None or not paper.also_on:
        return
    if exp.sweep is None:
        raise ConfigError("paper.also_on", "only a sweep's claims are judged on other datasets "
                          "(core.reproduce runs the files with sweep and paper sections)")
    check_variant_types(exp.name, exp.data.type, paper.also_on)
    for i, entry in enumerate(paper.also_on):
        where, kind = f"paper.also_on.{i}", entry.get("type")
        try:
            validate(apply_overrides(raw, variant_overrides(exp.name, entry), reg), reg)
        except ConfigError as e:
            path = e.path or ""
            if path == "data" or path.startswith("data."):
                raise ConfigError(where + path[len("data"):], e.message) from None
            raise ConfigError(where, f"on {kind}: {path + ': ' if path else ''}{e.message}") from None


# ------------------------------------------------------------------------------------------------
# which metrics a cell can produce
# ------------------------------------------------------------------------------------------------


def metric_patterns(exp: Any, reg: Any) -> Optional[list[str]]:
    """Regular expressions of the final metrics a validated run config can produce (the union of
    its evaluators' ``declared_metrics`` and the trainer's ``skipped_steps``), or None when an
    evaluator does not declare (anything may come out)."""
    from core.evaluation import declared_metrics, pattern

    declared = declared_metrics(exp, reg)
    return None if declared is None else [pattern(n) for n in declared]


def check_metric(where: str, metric: str, exp: Any, reg: Any, cell: str = "") -> None:
    patterns = metric_patterns(exp, reg)
    if patterns is None or any(re.fullmatch(p, metric) for p in patterns):
        return
    evals = ", ".join(e.type for e in exp.eval) or "none"
    from core.evaluation import declared_metrics

    names = sorted(n for n in declared_metrics(exp, reg) if n != "skipped_steps")
    in_cell = f" in cell '{cell}'" if cell else ""
    raise ConfigError(where, f"no evaluator{in_cell} produces '{metric}' (evaluators: {evals}; "
                      f"metrics: {', '.join(names) or 'none'})")


def check_study(raw: dict[str, Any], exp: Any, reg: Any) -> None:
    """The sweep and paper sections against the cells: called by ``core.config.validate``."""
    from core.sweep.space import cell_label, checked_points

    paper = exp.paper or Paper()
    if exp.sweep is None:
        for i, c in enumerate(paper.claims):
            check_metric(f"paper.claims.{i}.metric", c.metric, exp, reg)
        check_also_on(raw, exp, reg)
        return
    sw = exp.sweep
    points = checked_points(raw, sw)  # every cell's full config validates
    cells = {cell_label(pt): cell for pt, cell in points}
    if sw.sampler == "grid":
        check_paper(paper, list(cells))
        if sw.seed_range is not None and not paper.claims:
            raise ConfigError("sweep.seeds", "a seed range {min, max} adds seeds until the paper's claims are decided, "
                              "and this experiment has no paper.claims: state claims, or give a list of seeds")
        for label, cell in cells.items():
            check_metric("sweep.objective.metric", sw.objective.metric, cell, reg, label)
        for i, c in enumerate(paper.claims):
            for label in c.cells():
                check_metric(f"paper.claims.{i}.metric", c.metric, cells[label], reg, label)
    else:
        for label, cell in cells.items():
            check_metric("sweep.objective.metric", sw.objective.metric, cell, reg, label)
        for i, c in enumerate(paper.claims):
            for label, cell in cells.items():
                check_metric(f"paper.claims.{i}.metric", c.metric, cell, reg, label)
    for name in paper.metrics:
        problems = []
        for label, cell in cells.items():
            try:
                check_metric(f"paper.metrics.{name}", name, cell, reg, label)
                break
            except ConfigError as e:
                problems.append(e)
        else:
            if problems:
                raise problems[0]
    check_also_on(raw, exp, reg)  # last: an error of the file itself is reported as such, not as a variant's
