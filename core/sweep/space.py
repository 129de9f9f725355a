"""The sweep section's typed model, its space and its cells (no Optuna here).

``sweep.space`` maps dotted config keys to what varies there:
- named choices of whole sub-configs or values: ``model.quantizer: {1x1024: {type: mcq, ...}, ...}``
  (a list ``[a, b]`` names each value by itself);
- ``{choices: {...}, when: {other.key: name}}``: a conditional choice, active only in the cells where
  ``other.key`` took one of the named choices (grids enumerate exactly the cells that exist);
- a scalar range ``{low, high, log, step, integer}`` (TPE; a grid needs ``step``);
- the reserved key ``variant``: named choices, each a mapping of dotted keys to values applied
  together (a roadmap whose steps change several keys at once).
"""
from __future__ import annotations

import copy
import json
from collections import Counter
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.errors import ConfigError
from core.interfaces import VocabModel

DEFAULT_STORAGE = "optuna_journal.log"
VARIANT = "variant"  # reserved space key: named bundles of dotted overrides
RANGE_KEYS = {"low", "high", "log", "step", "integer", "when"}
MAX_RUNS = 100_000  # cells x seeds a grid may have: more is a typo (a tiny step), not a plan


# ------------------------------------------------------------------------------------------------
# the sweep section
# ------------------------------------------------------------------------------------------------


class Strict(VocabModel):
    model_config = ConfigDict(extra="forbid")


class Choices(Strict):
    """Named choices for one dotted key (or, under ``variant``, named override bundles)."""

    choices: dict[str, Any] = Field(min_length=1)  # name -> value (a whole sub-config, or a scalar)
    when: Optional[dict[str, Union[str, list[str]]]] = None  # active only where these keys took these choices

    @field_validator("choices", mode="before")
    @classmethod
    def _from_list(cls, v: Any) -> Any:
        if isinstance(v, list):
            return {_name(x): x for x in v}
        return v


class Range(Strict):
    """A scalar range: sampled by TPE, or enumerated by a grid when ``step`` is set."""

    low: float  # smallest value
    high: float  # largest value
    log: bool = False  # sample on a log scale
    step: Optional[float] = Field(None, gt=0)  # grid spacing (and TPE discretisation)
    integer: bool = False  # the value is an int
    when: Optional[dict[str, Union[str, list[str]]]] = None  # as for Choices

    @model_validator(mode="after")
    def _check(self) -> "Range":
        if self.high < self.low:
            raise ValueError(f"high {self.high} is below low {self.low}")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self

    def count(self) -> int:
        """Grid points, computed arithmetically (never by listing them)."""
        if self.step is None:
            return 0
        return int(round((self.high - self.low) / self.step)) + 1

    def grid(self) -> list[Any]:
        if self.step is None:
            return []
        n = self.count()
        if n > MAX_RUNS:
            raise ValueError(f"{n} grid points (more than {MAX_RUNS})")
        vals = [self.low + i * self.step for i in range(n)]
        return [int(round(v)) if self.integer else round(v, 12) for v in vals]


class Objective(Strict):
    metric: str = Field(min_length=1)  # a final evaluation metric, e.g. zero_shot_top1
    direction: Literal["maximize", "minimize"] = "maximize"


class Pruning(Strict):
    """Optuna MedianPruner on the objective metric at each periodic evaluation (train.eval_every)."""

    startup_trials: int = Field(3, ge=0)  # trials never pruned (the median needs a history)
    warmup_evals: int = Field(1, ge=0)  # evaluations of a trial before it may be pruned


class SeedRange(Strict):
    """``seeds: {min: 3, max: 12, budget_minutes: 60}``: seeds until decided (grid only). Every cell
    runs seeds 0 .. min-1; then seeds are added one at a time to both cells of every pair a still
    open claim compares, until every claim is decided, ``max`` seeds or the wall-time budget is spent
    (the sweep's running time over all its commands, recorded in the study; core.sweep.adaptive;
    judged with core.stats' group-sequential design)."""

    min: int = Field(3, ge=2)
    max: int = Field(12, ge=2)
    budget_minutes: Optional[float] = Field(None, gt=0)  # wall time over every command of the sweep; none: no limit
    # alpha spending over the looks (core.stats): "obf" (O'Brien-Fleming type) spends almost nothing
    # before 5 seeds and keeps the last look near the fixed-sample test; "pocock" spends evenly, so a
    # large effect can be decided at 3-4 seeds, at the price of a stricter last look (docs/CALIBRATION.md)
    spending: Literal["obf", "pocock"] = "obf"

    @model_validator(mode="after")
    def _order(self) -> "SeedRange":
        if self.max < self.min:
            raise ValueError(f"max: {self.max} is below min {self.min}")
        return self


class SweepConfig(Strict):
    sampler: Literal["grid", "tpe"] = "grid"  # grid: every cell exactly; tpe: hyper-parameter search
    space: dict[str, Union[Range, Choices]] = Field(min_length=1)  # dotted key -> choices or range
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)  # every cell runs once per seed
    objective: Objective  # what the study optimises (and the report calls best)
    n_trials: Optional[int] = Field(None, gt=0)  # tpe: trials in total over all workers and re-runs
    workers: int = Field(1, gt=0)  # cells run in parallel on this machine (processes)
    threads_per_worker: Optional[int] = Field(None, gt=0)  # torch threads per worker (default: cores / workers; workers 1: unchanged)
    storage: Optional[str] = None  # Optuna storage: a journal file path or a database URL
    study_name: Optional[str] = None  # default: the experiment name
    pruning: Optional[Pruning] = None  # tpe only: stop bad trials early
    sampler_seed: int = 0  # seed of the TPE sampler
    seed_range: Optional[SeedRange] = None  # set from ``seeds: {min, max}``; then ``seeds`` is 0 .. min-1

    @model_validator(mode="before")
    @classmethod
    def _seed_range(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("seeds"), dict):
            data = dict(data)
            try:
                rng = SeedRange.model_validate(data.pop("seeds"))
            except ValidationError as e:
                err = e.errors()[0]
                where = ".".join(["seeds", *(str(p) for p in err["loc"])])
                raise ValueError(f"{where}: {err['msg'].removeprefix('Value error, ')}") from None
            data["seed_range"], data["seeds"] = rng, list(range(rng.min))
        return data

    @field_validator("space", mode="before")
    @classmethod
    def _normalise(cls, space: Any) -> Any:
        if not isinstance(space, dict):
            return space
        return {k: _normalise_param(v) for k, v in space.items()}

    @field_validator("seeds")
    @classmethod
    def _unique(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"repeated seed in {seeds}")
        return seeds

    @model_validator(mode="after")
    def _check(self) -> "SweepConfig":
        if self.seed_range is not None and self.sampler != "grid":
            raise ValueError("seeds: a seed range {min, max} needs sampler grid")
        if self.sampler == "tpe" and self.n_trials is None:
            raise ValueError("n_trials: required with sampler tpe")
        if self.sampler == "grid":
            if self.pruning is not None:
                raise ValueError("pruning: only with sampler tpe (a grid runs every cell)")
            for key, p in self.space.items():
                if isinstance(p, Range) and p.step is None:
                    raise ValueError(f"space.{key}: a range in a grid needs a step (or use sampler tpe)")
        for key, p in self.space.items():
            if key == VARIANT and not (isinstance(p, Choices) and all(isinstance(v, dict) for v in p.choices.values())):
                raise ValueError(f"space.{VARIANT}: each variant is a mapping of dotted keys to values")
            for other, names in (p.when or {}).items():
                q = self.space.get(other)
                if not isinstance(q, Choices) or other == key:
                    raise ValueError(f"space.{key}.when.{other}: not a choice key of this space")
                for n in [names] if isinstance(names, str) else names:
                    if n not in q.choices:
                        raise ValueError(f"space.{key}.when.{other}: no choice '{n}' (choices: {', '.join(q.choices)})")
        return self

    def storage_url(self) -> str:
        return self.storage or DEFAULT_STORAGE

    def bookkeeping(self) -> set[str]:
        """Keys that do not change any result: left out of the study's identity (seeds may be added,
        workers and storage changed, a TPE budget raised)."""
        keys = {"seeds", "seed_range", "workers", "threads_per_worker", "storage", "study_name", "n_trials"}
        if self.sampler == "grid":
            keys.add("space")  # cells may be added; each cell's own config is checked on its own
        return keys


def _name(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, separators=(",", ":"))


def _normalise_param(v: Any) -> Any:
    if isinstance(v, list):
        return {"choices": v}
    if isinstance(v, dict) and "low" in v and "high" in v and set(v) <= RANGE_KEYS:
        return v
    if isinstance(v, dict) and "choices" in v and set(v) <= {"choices", "when"}:
        return v
    if isinstance(v, dict):
        return {"choices": v}
    return v  # pydantic names the problem


def parse_sweep(raw: Any) -> SweepConfig:
    try:
        return SweepConfig.model_validate(raw)
    except ValidationError as e:
        err = _pick_error(e.errors(), raw)
        loc = [str(p) for p in err["loc"] if not _is_branch(p)]
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (extra inputs are not permitted)"
        if msg.startswith(("space.", "n_trials", "pruning")):  # model-level checks name their own path
            path, _, msg = msg.partition(": ")
            loc = [path]
        raise ConfigError(".".join(["sweep", *loc]), msg[0].lower() + msg[1:]) from None


def _is_branch(part: Any) -> bool:
    """Union branch tags pydantic puts into error locations (``Range``, ``function-after[...]``)."""
    return isinstance(part, str) and (part in ("Range", "Choices") or "[" in part)


def _pick_error(errors: list[dict[str, Any]], raw: Any) -> dict[str, Any]:
    """For a space entry both union branches fail: report the branch its shape asked for."""
    for err in errors:
        loc = err["loc"]
        if len(loc) >= 3 and loc[0] == "space" and isinstance(raw, dict):
            value = _normalise_param((raw.get("space") or {}).get(loc[1]))
            want = "Choices" if isinstance(value, dict) and "choices" in value else "Range"
            if want not in str(loc[2]):
                continue
        return err
    return errors[0]


# ------------------------------------------------------------------------------------------------
# cells
# ------------------------------------------------------------------------------------------------


class Cell(BaseModel):
    """One point of the space: ``choices`` maps each active key to its choice name (or value)."""

    choices: dict[str, Any]
    seed: int

    @property
    def label(self) -> str:
        return cell_label(self.choices)

    @property
    def key(self) -> str:
        return f"{self.label}#seed={self.seed}"


def cell_label(choices: dict[str, Any]) -> str:
    """``8x2048`` for one key; ``mcq/attention`` for several (in space order)."""
    return "/".join(_name(v) for v in choices.values()) or "base"


def _active(p: Any, chosen: dict[str, Any]) -> bool:
    for other, names in (p.when or {}).items():
        allowed = [names] if isinstance(names, str) else names
        if other not in chosen or chosen[other] not in allowed:
            return False
    return True


def count_points(sw: SweepConfig) -> int:
    """The number of grid cells, counted without expanding the grid: only the values of keys that
    some ``when`` refers to are tracked (those are named choices, so few); the others multiply."""
    referenced = {other for p in sw.space.values() for other in (p.when or {})}
    states: Counter = Counter({(): 1})
    for key, p in sw.space.items():
        n = len(p.choices) if isinstance(p, Choices) else p.count()
        nxt: Counter = Counter()
        for state, mult in states.items():
            if not _active(p, dict(state)):
                nxt[state] += mult
            elif key in referenced:
                for o in _options(p):
                    nxt[state + ((key, o),)] += mult
            else:
                nxt[state] += mult * n
        states = nxt
    return sum(states.values())


def check_size(sw: SweepConfig) -> int:
    """Refuse a grid too large to list before listing it; returns the number of cells."""
    cells = count_points(sw)
    if cells * len(sw.seeds) > MAX_RUNS:
        big = max(sw.space, key=lambda k: len(sw.space[k].choices) if isinstance(sw.space[k], Choices) else sw.space[k].count())
        raise ConfigError("sweep.space", f"the grid has {cells:,} cells x {len(sw.seeds)} seeds, more than {MAX_RUNS:,} runs "
                          f"(largest: {big}); use a coarser step or sampler tpe")
    return cells


def grid_points(sw: SweepConfig) -> list[dict[str, Any]]:
    """Every combination of the space, conditional keys only where their condition holds."""
    check_size(sw)
    points: list[dict[str, Any]] = [{}]
    for key, p in sw.space.items():
        options = _options(p)
        nxt = []
        for pt in points:
            if _active(p, pt):
                nxt += [{**pt, key: o} for o in options]
            else:
                nxt.append(pt)
        points = nxt
    return points


def plan(sw: SweepConfig) -> list[Cell]:
    return [Cell(choices=pt, seed=s) for pt in grid_points(sw) for s in sw.seeds]


def pool(sw: SweepConfig) -> list[Cell]:
    """Every (cell, seed) the sweep may run: the plan, or with a seed range every seed below its max."""
    if sw.seed_range is None:
        return plan(sw)
    return [Cell(choices=pt, seed=s) for pt in grid_points(sw) for s in range(sw.seed_range.max)]


def compose(raw: dict[str, Any], sw: SweepConfig, choices: dict[str, Any], seed: int) -> dict[str, Any]:
    """The cell's full raw config: the base with each chosen value set at its dotted key. The
    ``sweep`` and ``paper`` sections are the study's, not the cell's: a cell is a plain run."""
    from core.config import set_dotted

    data = copy.deepcopy({k: v for k, v in raw.items() if k not in ("sweep", "paper")})
    for key, choice in choices.items():
        p = sw.space[key]
        value = p.choices[choice] if isinstance(p, Choices) else choice
        if key == VARIANT:
            for sub, v in value.items():
                set_dotted(data, str(sub).split("."), copy.deepcopy(v))
        else:
            set_dotted(data, key.split("."), copy.deepcopy(value))
    data["seed"] = seed
    return data


def validate_cell(raw: dict[str, Any], sw: SweepConfig, choices: dict[str, Any], seed: int) -> Any:
    """Validated cell config; a problem is re-rooted at the sweep key that caused it
    (``sweep.space.model.quantizer.8x2048.code_dim: ...``)."""
    from core.config import validate

    try:
        return validate(compose(raw, sw, choices, seed))
    except ConfigError as e:
        raise _reroot(e, sw, choices) from None


def _reroot(e: ConfigError, sw: SweepConfig, choices: dict[str, Any]) -> ConfigError:
    path = e.path or ""
    for key, choice in sorted(choices.items(), key=lambda kv: -len(kv[0])):  # the most specific key first
        p = sw.space[key]
        if key == VARIANT:
            for sub in p.choices[choice]:
                if path == sub or path.startswith(f"{sub}."):
                    return ConfigError(f"sweep.space.{VARIANT}.{choice}.{path}", e.message)
            continue
        if path == key:  # the key itself, or the chosen value as a whole
            return ConfigError(f"sweep.space.{key}", f"{e.message} (choice {_name(choice)})")
        if path.startswith(f"{key}."):
            mid = f".{choice}" if isinstance(p, Choices) else ""
            return ConfigError(f"sweep.space.{key}{mid}{path[len(key):]}", e.message)
    return ConfigError(path, f"{e.message} (in sweep cell {cell_label(choices)})")


def checked_points(raw: dict[str, Any], sw: SweepConfig) -> list[tuple[dict[str, Any], Any]]:
    """Validate every grid cell (or, for tpe, every choice and both ends of every range) before
    anything runs: (choices, validated cell config) for each point checked."""
    if sw.sampler == "grid":
        return [(pt, validate_cell(raw, sw, pt, sw.seeds[0])) for pt in grid_points(sw)]
    base = {k: (next(iter(p.choices)) if isinstance(p, Choices) else _range_value(p, p.low)) for k, p in sw.space.items()}
    checked = []
    for key, p in sw.space.items():
        options = list(p.choices) if isinstance(p, Choices) else [_range_value(p, p.low), _range_value(p, p.high)]
        for o in options:
            pt = {k: v for k, v in {**base, key: o}.items() if _active(sw.space[k], {**base, key: o})}
            checked.append((pt, validate_cell(raw, sw, pt, sw.seeds[0])))
    return checked


def check_all(raw: dict[str, Any], sw: SweepConfig) -> list[Cell]:
    """The planned cells (grid) or the checked points (tpe), every one validated."""
    points = checked_points(raw, sw)
    if sw.sampler == "grid":
        return [Cell(choices=pt, seed=s) for pt, _ in points for s in sw.seeds]
    return [Cell(choices=pt, seed=sw.seeds[0]) for pt, _ in points]


def _options(p: Any) -> list[Any]:
    return list(p.choices) if isinstance(p, Choices) else p.grid()


def _range_value(p: Range, v: float) -> Any:
    return int(round(v)) if p.integer else v


