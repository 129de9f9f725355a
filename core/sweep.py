"""Sweeps: an experiment's ``sweep:`` section run as an Optuna study, one MLflow child run per cell and seed.

``sweep.space`` maps dotted config keys to what varies there:
- named choices of whole sub-configs or values: ``model.quantizer: {1x1024: {type: mcq, ...}, ...}``
  (a list ``[a, b]`` names each value by itself);
- ``{choices: {...}, when: {other.key: name}}``: a conditional choice, active only in the cells where
  ``other.key`` took one of the named choices (grids enumerate exactly the cells that exist);
- a scalar range ``{low, high, log, step, integer}`` (TPE; a grid needs ``step``);
- the reserved key ``variant``: named choices, each a mapping of dotted keys to values applied
  together (a roadmap whose steps change several keys at once).

``sampler: grid`` enumerates every cell and seed exactly: the planner enqueues the missing ones
as WAITING trials and workers claim them atomically (the storage's WAITING -> RUNNING transition),
so N workers on one machine (``workers: N``) or on many (a PostgreSQL ``storage``) never run a cell
twice; a failed cell is recorded FAIL with its error and re-running the command runs only the
missing or failed cells. ``sampler: tpe`` runs ``n_trials`` TPE trials (each over every seed, the
objective averaged) with optional median pruning from the periodic evaluations of its first seed.

Storage: an Optuna journal file (``optuna_journal.log`` in the working directory; safe for several
processes on one machine through a file lock) unless ``sweep.storage`` is a database URL.
Inspect it with ``optuna-dashboard optuna_journal.log`` (or the URL).
"""
from __future__ import annotations

import copy
import json
import os
import socket
import sys
import threading
import time
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.config import set_dotted, validate
from core.errors import ConfigError

DEFAULT_STORAGE = "optuna_journal.log"
VARIANT = "variant"  # reserved space key: named bundles of dotted overrides
RANGE_KEYS = {"low", "high", "log", "step", "integer", "when"}
ATTR_CELL = "vtok.cell"  # trial user attributes
ATTR_KEY = "vtok.key"
ATTR_METRICS = "vtok.metrics"
ATTR_ERROR = "vtok.error"
ATTR_OWNER = "vtok.owner"
ATTR_RUN = "vtok.mlflow_run_id"
STUDY_PARENT = "vtok.mlflow_parent_run_id"


# ------------------------------------------------------------------------------------------------
# the sweep section
# ------------------------------------------------------------------------------------------------


class Strict(BaseModel):
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

    def grid(self) -> list[Any]:
        if self.step is None:
            return []
        n = int(round((self.high - self.low) / self.step)) + 1
        vals = [self.low + i * self.step for i in range(n)]
        return [int(round(v)) if self.integer else round(v, 12) for v in vals]


class Objective(Strict):
    metric: str = Field(min_length=1)  # a final evaluation metric, e.g. zero_shot_top1
    direction: Literal["maximize", "minimize"] = "maximize"


class Pruning(Strict):
    """Optuna MedianPruner on the objective metric at each periodic evaluation (train.eval_every)."""

    startup_trials: int = Field(3, ge=0)  # trials never pruned (the median needs a history)
    warmup_evals: int = Field(1, ge=0)  # evaluations of a trial before it may be pruned


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


def grid_points(sw: SweepConfig) -> list[dict[str, Any]]:
    """Every combination of the space, conditional keys only where their condition holds."""
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


def compose(raw: dict[str, Any], sw: SweepConfig, choices: dict[str, Any], seed: int) -> dict[str, Any]:
    """The cell's full raw config: the base with each chosen value set at its dotted key."""
    data = copy.deepcopy(raw)
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


def check_all(raw: dict[str, Any], sw: SweepConfig) -> list[Cell]:
    """Validate every grid cell (or, for tpe, every choice and both ends of every range) before
    anything runs. Returns the planned cells (grid) or the checked points (tpe)."""
    if sw.sampler == "grid":
        cells = plan(sw)
        for pt in grid_points(sw):
            validate_cell(raw, sw, pt, sw.seeds[0])
        return cells
    base = {k: (next(iter(p.choices)) if isinstance(p, Choices) else _range_value(p, p.low)) for k, p in sw.space.items()}
    checked = []
    for key, p in sw.space.items():
        options = list(p.choices) if isinstance(p, Choices) else [_range_value(p, p.low), _range_value(p, p.high)]
        for o in options:
            pt = {k: v for k, v in {**base, key: o}.items() if _active(sw.space[k], {**base, key: o})}
            validate_cell(raw, sw, pt, sw.seeds[0])
            checked.append(Cell(choices=pt, seed=sw.seeds[0]))
    return checked


def _options(p: Any) -> list[Any]:
    return list(p.choices) if isinstance(p, Choices) else p.grid()


def _range_value(p: Range, v: float) -> Any:
    return int(round(v)) if p.integer else v


# ------------------------------------------------------------------------------------------------
# storage and study
# ------------------------------------------------------------------------------------------------


def make_storage(url: str) -> Any:
    """A database URL -> RDBStorage (with heartbeats, so a dead worker's cell is retried);
    a path -> a journal file with an ``open(O_EXCL)`` lock (safe for processes on one machine)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    if "://" in url:
        return _rdb_storage(url)
    path = Path(url).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    path = str(path)
    return optuna.storages.JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))


def _rdb_storage(url: str, attempts: int = 6) -> Any:
    """RDBStorage; workers that start together on an empty database race to create Optuna's tables
    (PostgreSQL then raises a unique violation on its catalog): the loser waits and tries again,
    and by then the tables exist."""
    import random
    import time

    import optuna
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():  # heartbeats are marked experimental in Optuna 4
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, heartbeat_interval=30, grace_period=120)
        except (IntegrityError, ProgrammingError, OperationalError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 + random.random() * (attempt + 1))


def study_name(exp: Any, sw: SweepConfig) -> str:
    return sw.study_name or exp.name


def open_study(exp: Any, sw: SweepConfig, create: bool = True) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = make_storage(sw.storage_url())
    direction = sw.objective.direction
    sampler = optuna.samplers.TPESampler(seed=sw.sampler_seed) if sw.sampler == "tpe" else None
    pruner = None
    if sw.pruning is not None:
        pruner = optuna.pruners.MedianPruner(n_startup_trials=sw.pruning.startup_trials, n_warmup_steps=sw.pruning.warmup_evals)
    elif sw.sampler == "tpe":
        pruner = optuna.pruners.NopPruner()
    name = study_name(exp, sw)
    if not create:
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    return optuna.create_study(study_name=name, storage=storage, direction=direction, sampler=sampler,
                               pruner=pruner, load_if_exists=True)


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _owner_dead(owner: str | None) -> bool:
    """True when the trial's worker ran on this machine and its process is gone."""
    if not owner or ":" not in owner:
        return False
    host, pid = owner.rsplit(":", 1)
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return int(pid) != os.getpid() and _is_zombie(int(pid))


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return False


def fail_stale(study: Any, tracking: Any = None) -> None:
    """Trials left RUNNING by a killed worker of this machine (or, on RDB storage, whose heartbeat
    stopped) become FAIL, so the planner enqueues them again; their MLflow runs become KILLED."""
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    if hasattr(study._storage, "get_heartbeat_interval"):
        try:
            fail_stale_trials(study)
        except Exception:  # noqa: BLE001 - a storage without heartbeats
            pass
    stale = []
    for t in study.get_trials(deepcopy=False):
        if t.number in before and t.state == TrialState.FAIL:
            stale.append(t)
        elif t.state == TrialState.RUNNING and _owner_dead(t.user_attrs.get(ATTR_OWNER)):
            study._storage.set_trial_user_attr(t._trial_id, ATTR_ERROR, "worker process died (killed?)")
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            stale.append(t)
    if tracking is not None and tracking.enabled and stale:
        _kill_runs([t.user_attrs.get(ATTR_RUN) for t in stale], tracking, study.user_attrs.get(STUDY_PARENT),
                   {str(t.number) for t in stale})


def _kill_runs(run_ids: list[str | None], tracking: Any, parent_id: str | None = None, trials: set[str] = frozenset()) -> None:
    """Close the MLflow runs of dead trials as KILLED. A worker killed between creating its run and
    recording the run id on the trial leaves a run the trial does not name: those are found as the
    parent's RUNNING children tagged with a dead trial's number."""
    from mlflow.tracking import MlflowClient

    from core.tracking import resolve_uri

    client = MlflowClient(tracking_uri=resolve_uri(tracking.uri))
    if parent_id and trials:
        try:
            experiment_id = client.get_run(parent_id).info.experiment_id
            orphans = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}' and attributes.status = 'RUNNING'")
            run_ids = list(run_ids) + [r.info.run_id for r in orphans if r.data.tags.get("vtok.trial") in trials]
        except Exception as e:  # noqa: BLE001 - tracking trouble must not stop the sweep
            print(f"vtok sweep: could not search for orphaned MLflow runs: {e}", file=sys.stderr)
    for rid in dict.fromkeys(filter(None, run_ids)):
        try:
            if client.get_run(rid).info.status == "RUNNING":
                client.set_terminated(rid, "KILLED")
        except Exception as e:  # noqa: BLE001 - a run deleted by hand, another store
            print(f"vtok sweep: could not close MLflow run {rid}: {e}", file=sys.stderr)


@contextmanager
def heartbeat(study: Any, trial: Any) -> Iterator[None]:
    """On RDB storage, record the trial's heartbeat while it runs, so workers on other machines can
    tell a dead worker's RUNNING trial from a live one (``fail_stale_trials``)."""
    storage = study._storage
    interval = storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None
    if not interval:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            storage.record_heartbeat(trial._trial_id)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def enqueue_missing(study: Any, cells: list[Cell]) -> int:
    """Enqueue each cell that has no COMPLETE, RUNNING or WAITING trial; returns how many."""
    from optuna.trial import TrialState

    live = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)
    have = {t.user_attrs.get(ATTR_KEY) for t in study.get_trials(deepcopy=False, states=live)}
    n = 0
    for c in cells:
        if c.key not in have:
            study.enqueue_trial({**{k: v for k, v in c.choices.items()}, "seed": c.seed},
                                user_attrs={ATTR_KEY: c.key, ATTR_CELL: c.label})
            n += 1
    return n


def claim(study: Any) -> Any | None:
    """Atomically take one WAITING trial (WAITING -> RUNNING succeeds for exactly one worker)."""
    import optuna
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    storage = study._storage
    for t in storage.get_all_trials(study._study_id, deepcopy=False, states=(TrialState.WAITING,)):
        try:
            if storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                return optuna.Trial(study, t._trial_id)
        except UpdateFinishedTrialError:
            continue
    return None


def duplicate_of(study: Any, trial: Any) -> int | None:
    """Planners racing at start-up may enqueue one cell twice: the lowest-numbered live (or a
    complete) trial of the key runs, the other is dropped. Returns the trial it duplicates."""
    from optuna.trial import TrialState

    key = study._storage.get_trial(trial._trial_id).user_attrs.get(ATTR_KEY)
    for t in study.get_trials(deepcopy=False):
        if t.number == trial.number or t.user_attrs.get(ATTR_KEY) != key:
            continue
        if t.state == TrialState.COMPLETE or (t.state in (TrialState.RUNNING, TrialState.WAITING) and t.number < trial.number):
            return t.number
    return None


# ------------------------------------------------------------------------------------------------
# MLflow parent run
# ------------------------------------------------------------------------------------------------


def parent_run(exp: Any, sw: SweepConfig, study: Any, planned: int) -> str | None:
    """The sweep's parent MLflow run, shared by every worker and re-run through a study attribute."""
    if not exp.tracking.enabled:
        return None
    from core.tracking import MlflowTracker

    existing = study.user_attrs.get(STUDY_PARENT)
    tracker = MlflowTracker(exp.tracking.uri, exp.tracking.experiment or exp.name)
    if existing:
        try:
            tracker.client.update_run(existing, status="RUNNING")
            return existing
        except Exception:  # deleted from MLflow: start a new one
            pass
    tags = {"vtok.sweep": "parent", "vtok.study": study.study_name, "vtok.storage": _display_storage(sw.storage_url()),
            "vtok.sampler": sw.sampler, "vtok.objective": f"{sw.objective.direction} {sw.objective.metric}",
            "vtok.planned_runs": str(planned)}
    if exp.paper and exp.paper.get("source"):
        tags["vtok.paper"] = str(exp.paper["source"])
    params = {"sweep.sampler": sw.sampler, "sweep.seeds": sw.seeds, "sweep.keys": ",".join(sw.space),
              "sweep.study": study.study_name, "sweep.storage": _display_storage(sw.storage_url())}
    run_id = tracker.start(f"{study.study_name} (sweep)", params, tags)
    study.set_user_attr(STUDY_PARENT, run_id)
    time.sleep(0.05)
    winner = _reload_attr(study, STUDY_PARENT)
    if winner and winner != run_id:  # another worker created one at the same moment: use theirs
        tracker.client.delete_run(run_id)
        return winner
    return run_id


def _reload_attr(study: Any, key: str) -> Any:
    return study._storage.get_study_user_attrs(study._study_id).get(key)


def _display_storage(url: str) -> str:
    if "://" in url and "@" in url:  # never record a password
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url if "://" in url else str(Path(url).resolve())


def finish_parent(exp: Any, study: Any, cells: list[Cell]) -> None:
    from optuna.trial import TrialState

    run_id = study.user_attrs.get(STUDY_PARENT) or _reload_attr(study, STUDY_PARENT)
    if not run_id or not exp.tracking.enabled:
        return
    from core.tracking import resolve_uri
    from mlflow.tracking import MlflowClient

    trials = study.get_trials(deepcopy=False)
    done = {t.user_attrs.get(ATTR_KEY) for t in trials if t.state == TrialState.COMPLETE}
    busy = any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)
    client = MlflowClient(tracking_uri=resolve_uri(exp.tracking.uri))
    client.set_tag(run_id, "vtok.completed_runs", str(len(done)))
    if busy:
        return  # another worker is still going: it closes the parent
    status = "FINISHED" if all(c.key in done for c in cells) else "FAILED"
    client.set_terminated(run_id, status)


# ------------------------------------------------------------------------------------------------
# running cells
# ------------------------------------------------------------------------------------------------


class CellTracker:
    """Wraps the trainer's MLflow tracker: run name ``<cell>-seed<k>`` and the cell's choices as
    params (``sweep.<key>``) and tags, so the MLflow compare view lines cells up."""

    def __new__(cls, exp: Any, extra_params: dict[str, Any], run_name: str, trial: Any = None) -> Any:
        from core.tracking import MlflowTracker

        class _Tracker(MlflowTracker):
            def start(self, _run_name, params, tags, run_id=None, parent_run_id=None):
                # the paper's figures and the sweep's space are not the run's config (and their free-form
                # keys need not be valid MLflow param names): they live on the parent run
                own = {k: v for k, v in params.items() if not k.startswith(("paper.", "sweep."))}
                rid = super().start(run_name, {**own, **extra_params}, tags, run_id=run_id, parent_run_id=parent_run_id)
                if trial is not None:  # so a re-run can close the MLflow run of a worker that was killed
                    trial.set_user_attr(ATTR_RUN, rid)
                return rid

        return _Tracker(exp.tracking.uri, exp.tracking.experiment or exp.name, exp.tracking.flush_every)


def run_cell(exp: Any, cell_choices: dict[str, Any], seed: int, trial: Any, parent_id: str | None,
             sw: SweepConfig, report_to_trial: bool = False) -> dict[str, float]:
    """Build and train one cell; raises on failure (after the child run is marked FAILED)."""
    from core.trainer import build, train
    from core.tracking import Tracker

    label = cell_label(cell_choices)
    tags = {"vtok.sweep": "child", "vtok.cell": label, "vtok.seed": str(seed), "vtok.trial": str(trial.number),
            "vtok.study": trial.study.study_name, **{f"sweep.{k}": _name(v) for k, v in cell_choices.items()}}
    params = {f"sweep.{k}": _name(v) for k, v in cell_choices.items()}
    tracker = CellTracker(exp, params, f"{label} seed {seed}", trial) if exp.tracking.enabled else Tracker()

    on_eval = None
    if report_to_trial:
        import optuna

        def on_eval(step: int, metrics: dict[str, float]) -> None:
            if sw.objective.metric in metrics:
                trial.report(metrics[sw.objective.metric], step)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at step {step}")

    try:
        built = build(exp)
        result = train(exp, built=built, parent_run_id=parent_id, tags=tags, on_eval=on_eval, tracker=tracker)
    except BaseException as e:
        _record_failure(exp, tracker, tags, params, parent_id, f"{label} seed {seed}", e)
        raise
    return result.metrics


def _record_failure(exp: Any, tracker: Any, tags: dict[str, str], params: dict[str, Any], parent_id: str | None,
                    run_name: str, e: BaseException) -> None:
    import optuna

    if isinstance(e, KeyboardInterrupt) or not exp.tracking.enabled:
        return
    if isinstance(e, optuna.TrialPruned):
        if tracker.run_id is not None:
            tracker.set_tags({"vtok.pruned": str(e)})
        return
    err = _error_text(e)
    try:
        if tracker.run_id is None:  # failed before the trainer opened its run: open one to say so
            tracker.start(run_name, params, {**tags, "vtok.error": err}, parent_run_id=parent_id)
            tracker.end("FAILED")
        else:
            tracker.set_tags({"vtok.error": err})
            if tracker.client.get_run(tracker.run_id).info.status == "RUNNING":  # failed inside start()
                tracker.client.set_terminated(tracker.run_id, "FAILED")
    except Exception as track_err:  # tracking trouble must not hide the cell's own error
        print(f"vtok sweep: could not record the failure in MLflow: {track_err}", file=sys.stderr)


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:4000]


def _worker_setup(raw: dict[str, Any], threads: int | None) -> tuple[SweepConfig, Any, str | None]:
    """A worker's (sweep config, study, MLflow parent run id), with its torch thread count set."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    exp = validate(raw)
    sw = parse_sweep(exp.sweep)
    study = open_study(exp, sw)
    return sw, study, study.user_attrs.get(STUDY_PARENT)


def grid_worker(raw: dict[str, Any], threads: int | None = None) -> int:
    """Claim and run WAITING cells until none is left. Returns the number of failed cells."""
    import optuna

    sw, study, parent_id = _worker_setup(raw, threads)
    failed = 0
    while (trial := claim(study)) is not None:
        trial.set_user_attr(ATTR_OWNER, _owner())
        dup = duplicate_of(study, trial)
        if dup is not None:
            trial.set_user_attr(ATTR_ERROR, f"duplicate of trial {dup} (planners raced); not run")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            continue
        fixed = study._storage.get_trial_system_attrs(trial._trial_id).get("fixed_params", {})
        # the same distribution for a key in every trial (Optuna requires it); values fixed by the queue
        choices = {k: trial.suggest_categorical(k, _options(sw.space[k])) for k in sw.space if k in fixed}
        seed = trial.suggest_categorical("seed", list(sw.seeds))
        with heartbeat(study, trial):
            state = _run_trial(study, trial, raw, sw, choices, [seed], parent_id, prune=False)
        failed += state == "FAIL"
    return failed


def _run_trial(study: Any, trial: Any, raw: dict[str, Any], sw: SweepConfig, choices: dict[str, Any],
               seeds: list[int], parent_id: str | None, prune: bool) -> str:
    """Run a trial's cell over ``seeds``; tell the study COMPLETE (mean objective), PRUNED or FAIL."""
    import optuna
    from optuna.trial import TrialState

    label = cell_label(choices)
    values, per_seed = [], {}
    try:
        for i, seed in enumerate(seeds):
            cell_exp = validate_cell(raw, sw, choices, seed)
            cell_exp.train.progress = False  # the sweep's own bar (core.progress) shows progress
            print(f"vtok sweep: trial {trial.number} cell {label} seed {seed}", file=sys.stderr)
            metrics = run_cell(cell_exp, choices, seed, trial, parent_id, sw, report_to_trial=prune and i == 0)
            if sw.objective.metric not in metrics:
                raise ConfigError("sweep.objective.metric", f"'{sw.objective.metric}' is not among the cell's metrics "
                                  f"({', '.join(sorted(metrics)) or 'none'}): add its evaluator to eval")
            per_seed[str(seed)] = metrics
            values.append(metrics[sw.objective.metric])
    except optuna.TrialPruned:
        trial.set_user_attr(ATTR_METRICS, per_seed)
        study.tell(trial, state=TrialState.PRUNED)
        return "PRUNED"
    except KeyboardInterrupt:
        trial.set_user_attr(ATTR_ERROR, "interrupted")
        study.tell(trial, state=TrialState.FAIL)
        raise
    except Exception as e:
        print(f"vtok sweep: cell {label} FAILED: {_error_text(e)}", file=sys.stderr)
        if os.environ.get("VTOK_DEBUG"):
            traceback.print_exc()
        trial.set_user_attr(ATTR_ERROR, _error_text(e))
        trial.set_user_attr(ATTR_METRICS, per_seed)
        study.tell(trial, state=TrialState.FAIL)
        return "FAIL"
    trial.set_user_attr(ATTR_METRICS, per_seed)
    study.tell(trial, sum(values) / len(values))
    return "COMPLETE"


def tpe_worker(raw: dict[str, Any], threads: int | None = None) -> int:
    """Ask TPE for trials until ``n_trials`` COMPLETE, PRUNED or RUNNING exist (workers starting at
    the same moment may overshoot by one each); each trial runs every seed."""
    from optuna.trial import TrialState

    sw, study, parent_id = _worker_setup(raw, threads)
    failed = 0
    counted = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    while len(study.get_trials(deepcopy=False, states=counted)) < sw.n_trials:
        trial = study.ask()
        trial.set_user_attr(ATTR_OWNER, _owner())
        choices = suggest(trial, sw)
        trial.set_user_attr(ATTR_CELL, cell_label(choices))
        with heartbeat(study, trial):
            state = _run_trial(study, trial, raw, sw, choices, sw.seeds, parent_id, prune=sw.pruning is not None)
        if state == "FAIL":
            failed += 1
            if failed >= sw.n_trials:  # every trial failing is a broken setup, not bad luck
                break
    return failed


def suggest(trial: Any, sw: SweepConfig) -> dict[str, Any]:
    chosen: dict[str, Any] = {}
    for key, p in sw.space.items():
        if not _active(p, chosen):
            continue
        if isinstance(p, Choices):
            chosen[key] = trial.suggest_categorical(key, list(p.choices))
        elif p.integer:
            chosen[key] = trial.suggest_int(key, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            chosen[key] = trial.suggest_float(key, p.low, p.high, step=p.step, log=p.log)
    return chosen


# ------------------------------------------------------------------------------------------------
# entry point (core.run dispatches here)
# ------------------------------------------------------------------------------------------------


def print_plan(exp: Any, sw: SweepConfig, cells: list[Cell]) -> None:
    print(f"# sweep {study_name(exp, sw)}: sampler {sw.sampler}, objective {sw.objective.direction} {sw.objective.metric}, "
          f"storage {_display_storage(sw.storage_url())}, workers {sw.workers}")
    if sw.sampler == "grid":
        labels = list(dict.fromkeys(c.label for c in cells))
        print(f"# {len(labels)} cells x {len(sw.seeds)} seeds = {len(cells)} runs")
        for pt in grid_points(sw):
            print(f"{cell_label(pt)}: " + ", ".join(f"{k}={_name(v)}" for k, v in pt.items()))
    else:
        print(f"# {sw.n_trials} TPE trials x {len(sw.seeds)} seeds; space:")
        for key, p in sw.space.items():
            desc = ", ".join(p.choices) if isinstance(p, Choices) else f"[{p.low}, {p.high}]{' log' if p.log else ''}"
            print(f"{key}: {desc}")


def main(path: str, raw: dict[str, Any], exp: Any, dry_run: bool = False) -> int:
    sw = parse_sweep(exp.sweep)
    cells = check_all(raw, sw)  # every cell validates before anything runs
    if dry_run:
        print_plan(exp, sw, cells)
        return 0
    study = open_study(exp, sw)
    if sw.sampler == "grid":
        fail_stale(study, exp.tracking)
        added = enqueue_missing(study, cells)
        total = len(cells)
        print(f"vtok sweep: study '{study.study_name}' ({_display_storage(sw.storage_url())}): "
              f"{total - added} of {total} runs done or under way, {added} to run", file=sys.stderr)
    else:
        fail_stale(study, exp.tracking)
        total = sw.n_trials * len(sw.seeds)
    parent_id = parent_run(exp, sw, study, total)
    t0 = time.perf_counter()
    try:
        with watch(study, sw, exp, total):
            failed = run_workers(raw, sw)
    except KeyboardInterrupt:
        if parent_id:
            _kill_runs([parent_id], exp.tracking)
        raise
    finish_parent(exp, study, cells if sw.sampler == "grid" else [])
    print(f"vtok sweep: done in {time.perf_counter() - t0:.0f} s; failed runs: {failed}. "
          f"Report: python -m core.report {path}", file=sys.stderr)
    summarise(raw, exp)
    return 1 if failed else 0


def watch(study: Any, sw: SweepConfig, exp: Any, total: int) -> Any:
    """A live line per landed run (cell, seed, objective) and a whole-sweep bar with an ETA (core.progress)."""
    from optuna.trial import TrialState

    from core.progress import StudyWatcher, SweepProgress

    per_trial = 1 if sw.sampler == "grid" else len(sw.seeds)
    done = sum(per_trial for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    progress = SweepProgress(total, min(done, total), sw.objective.metric, bar=exp.train.progress)

    def label(t: Any) -> str:
        cell = t.user_attrs.get(ATTR_CELL, f"#{t.number}")
        return f"{cell} seed {t.params['seed']}" if sw.sampler == "grid" and "seed" in t.params else f"trial {t.number} {cell}"

    def runs(t: Any) -> int:
        return 0 if str(t.user_attrs.get(ATTR_ERROR, "")).startswith("duplicate of trial") else per_trial

    return StudyWatcher(study, progress, label, runs)


def summarise(raw: dict[str, Any], exp: Any) -> None:
    """Write the report and put it and the per-cell means on the parent run (``python -m core.report``
    does the same on demand); never fails the sweep."""
    from core import report

    try:
        _, md_path, png, attached = report.write_report(raw, report.stored_view(raw), Path(exp.train.out_dir).parent / "reports")
        print(f"vtok sweep: report {md_path}, {png}" + (f" (attached to the parent MLflow run {attached})" if attached else ""),
              file=sys.stderr)
        if attached:
            from core.tracking import ui_hint

            print(f"vtok sweep: to look: {ui_hint(exp.tracking.uri, run_id=attached)}", file=sys.stderr)
    except Exception as e:  # noqa: BLE001
        print(f"vtok sweep: no report ({type(e).__name__}: {e})", file=sys.stderr)


def run_workers(raw: dict[str, Any], sw: SweepConfig) -> int:
    target = grid_worker if sw.sampler == "grid" else tpe_worker
    if sw.workers == 1:  # in this process: torch's thread count is the caller's unless set here
        import torch

        before = torch.get_num_threads()
        try:
            return target(raw, sw.threads_per_worker)
        finally:
            torch.set_num_threads(before)
    # small models on a busy CPU lose badly to oversubscription (measured 6x slower per step with
    # 2 threads on 2 loaded cores): split the cores between the workers
    threads = sw.threads_per_worker or max(1, (os.cpu_count() or 1) // sw.workers)
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # fresh interpreters: no forked torch thread pools
    with ctx.Pool(sw.workers) as pool:
        return sum(pool.starmap(target, [(raw, threads)] * sw.workers))
