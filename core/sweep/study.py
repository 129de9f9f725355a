"""The study and its storage: the only module that touches Optuna (including the few private
storage calls it needs, pinned by ``tests/test_sweep_study.py`` to ``SUPPORTED_OPTUNA``).

A study's identity is everything that determines its results: the resolved experiment config
(base and overrides) without its bookkeeping (seeds, workers, storage, progress, tracking, the TPE
budget; a grid's space too, since cells may be added and each cell's own config is recorded and
checked on its own). The default study name is ``<experiment>-<8 hex digits of that identity>``,
so a changed config is a different study; a study named by hand (``sweep.study_name``) whose
recorded identity differs is refused with one line naming the keys.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import warnings
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Optional

from core.errors import ConfigError
from core.sweep.record import RECORD, TrialRecord, TrialView
from core.sweep.space import SweepConfig

SUPPORTED_OPTUNA = ((4, 0), (5, 0))  # [lowest, first unsupported): the private calls below are checked on these
IDENTITY = "vtok.identity"  # study user attributes
CELL_CONFIG = "vtok.cell_config:"  # + cell label -> that cell's flattened config
PARENT_RUN = "vtok.mlflow_parent_run_id"
RDB_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql")


# ------------------------------------------------------------------------------------------------
# identity
# ------------------------------------------------------------------------------------------------


def run_identity(cfg: dict[str, Any]) -> dict[str, Any]:
    """A resolved run config (``to_dict``) without what does not change its results, flattened."""
    from core.config import flatten

    d = json.loads(json.dumps(cfg))
    for k in ("seed", "tracking", "paper", "sweep", "name"):
        d.pop(k, None)
    for k in ("progress", "resume", "out_dir", "log_every", "ckpt_every", "keep_checkpoints"):
        d.get("train", {}).pop(k, None)
    return flatten(d)


def identity(exp: Any) -> dict[str, Any]:
    """The study's identity: the experiment's run identity plus the sweep's result-relevant keys."""
    from core.config import flatten, to_dict

    sw: SweepConfig = exp.sweep
    d = to_dict(exp)
    ident = run_identity(d)
    ident["name"] = exp.name
    sweep = {k: v for k, v in d["sweep"].items() if k not in sw.bookkeeping()}
    ident.update(flatten(sweep, "sweep."))
    return ident


def digest(ident: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:8]


def study_name(exp: Any, sw: SweepConfig) -> str:
    return sw.study_name or f"{exp.name}-{digest(identity(exp))}"


def differences(old: dict[str, Any], new: dict[str, Any], limit: int = 6) -> str:
    """``train.steps: 20 -> 25, model.x: (none) -> 3`` for the keys that differ."""
    keys = sorted(set(old) | set(new), key=str)
    diff = [f"{k}: {_show(old.get(k, '(none)'))} -> {_show(new.get(k, '(none)'))}" for k in keys if old.get(k) != new.get(k)]
    more = f" and {len(diff) - limit} more" if len(diff) > limit else ""
    return ", ".join(diff[:limit]) + more


def _show(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


# ------------------------------------------------------------------------------------------------
# storage
# ------------------------------------------------------------------------------------------------


def display_storage(url: str) -> str:
    if "://" in url and "@" in url:  # never record a password
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url if "://" in url else str(Path(url).resolve())


def check_storage(url: str, must_exist: bool = False) -> None:
    """Bad storage -> one ConfigError at ``sweep.storage``, before anything is written: an unknown
    scheme, a directory where a file belongs, a sqlite file in a missing directory, a database that
    does not answer, a file that is not an Optuna journal."""
    where = "sweep.storage"
    if "://" in url:
        scheme = url.split("://", 1)[0]
        if scheme.split("+", 1)[0] not in RDB_SCHEMES:
            raise ConfigError(where, f"unknown scheme '{scheme}' (a journal file path, or sqlite:///, postgresql://, mysql:// URL)")
        if scheme.startswith("sqlite"):
            path = url.split("://", 1)[1].removeprefix("/")
            if path and path != ":memory:":
                p = Path(path)
                if p.is_dir():
                    raise ConfigError(where, f"{p} is a directory, not a database file")
                if not p.parent.is_dir():
                    raise ConfigError(where, f"directory {p.parent} does not exist (for {display_storage(url)})")
                if must_exist and not p.is_file():
                    raise ConfigError(where, f"no study storage at {p.resolve()}: run the sweep first")
            return
        _check_reachable(url)
        return
    p = Path(url)
    if p.is_dir():
        raise ConfigError(where, f"{p.resolve()} is a directory, not a journal file (give a file path such as {p / 'optuna_journal.log'})")
    if must_exist and not p.is_file():
        raise ConfigError(where, f"no study storage at {p.resolve()}: run the sweep first "
                          "(python -m core.run EXP.yaml), from the same working directory")
    if p.is_file():
        _check_journal(p)
    elif p.parent.exists() and not p.parent.is_dir():
        raise ConfigError(where, f"{p.parent} is a file, not a directory")


def _check_journal(p: Path) -> None:
    try:
        with p.open("rb") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except ValueError:
                    entry = None
                if not isinstance(entry, dict) or "op_code" not in entry:
                    raise ConfigError("sweep.storage", f"{p.resolve()} is not an Optuna journal (line {i} is not a journal entry)")
    except OSError as e:
        raise ConfigError("sweep.storage", f"cannot read {p.resolve()}: {e.strerror}") from None


def _check_reachable(url: str) -> None:
    try:
        import sqlalchemy

        args = {"connect_timeout": 5} if url.startswith(("postgres", "mysql")) else {}
        engine = sqlalchemy.create_engine(url, connect_args=args)
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()
    except Exception as e:  # noqa: BLE001 - any driver's error: unreachable, refused, no driver, bad URL
        msg = (str(getattr(e, "orig", None) or e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError("sweep.storage", f"cannot connect to {display_storage(url)}: {msg}") from None


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
    (PostgreSQL then raises a unique violation on its catalog): the loser waits and tries again."""
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


def _sampler(sw: SweepConfig, seed: Optional[int] = None) -> Any:
    import optuna

    if sw.sampler != "tpe":
        return optuna.samplers.RandomSampler(seed=0)  # never asked: grid trials carry their cell
    with warnings.catch_warnings():  # constant_liar is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=sw.sampler_seed if seed is None else seed, constant_liar=True)


def open_study(exp: Any, sw: SweepConfig, create: bool = True) -> Any:
    """The study of this experiment config: created on first use with the config's identity recorded;
    an existing study of that name must have been made by the same config (else one ConfigError)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = make_storage(sw.storage_url())
    pruner = None
    if sw.pruning is not None:
        pruner = optuna.pruners.MedianPruner(n_startup_trials=sw.pruning.startup_trials, n_warmup_steps=sw.pruning.warmup_evals)
    else:
        pruner = optuna.pruners.NopPruner()
    name, ident = study_name(exp, sw), identity(exp)
    if not create:
        study = optuna.load_study(study_name=name, storage=storage, sampler=_sampler(sw), pruner=pruner)
    else:
        study = optuna.create_study(study_name=name, storage=storage, direction=sw.objective.direction,
                                    sampler=_sampler(sw), pruner=pruner, load_if_exists=True)
    recorded = study.user_attrs.get(IDENTITY)
    if recorded is None and create:
        if not study.trials:
            study.set_user_attr(IDENTITY, ident)
            recorded = ident
        else:  # another command created the study after our read and has begun (it records the
            recorded = study.user_attrs.get(IDENTITY)  # identity before its first trial): read again
    if recorded != ident:
        how = ("choose another sweep.study_name (or drop it: each config then gets a study of its own)" if sw.study_name
               else "give the same overrides as that run")
        what = differences(recorded, ident) if recorded else "it records no config (made by an older vtok)"
        raise ConfigError("sweep.study_name" if sw.study_name else "sweep", f"study '{name}' in {display_storage(sw.storage_url())} "
                          f"was run with another config ({what}): {how}")
    return study


def studies_like(exp: Any, sw: SweepConfig) -> list[tuple[str, dict[str, Any]]]:
    """(name, identity) of every study in the storage made from this experiment (its name)."""
    import optuna

    out = []
    for s in optuna.get_all_study_summaries(make_storage(sw.storage_url()), include_best_trial=False):
        ident = s.user_attrs.get(IDENTITY)
        if isinstance(ident, dict) and ident.get("name") == exp.name:
            out.append((s.study_name, ident))
    return out


def study_exists(exp: Any, sw: SweepConfig) -> bool:
    import optuna

    names = optuna.get_all_study_names(make_storage(sw.storage_url()))
    return study_name(exp, sw) in names


def check_cell_configs(study: Any, cells: dict[str, dict[str, Any]]) -> None:
    """Each cell label means one config for the life of a study: a choice whose definition changed
    under the same name is refused (its results would be mixed with the old ones)."""
    attrs = study.user_attrs
    for label, flat in cells.items():
        old = attrs.get(CELL_CONFIG + label)
        if old is None:
            study.set_user_attr(CELL_CONFIG + label, flat)
        elif old != flat:
            raise ConfigError("sweep.space", f"cell '{label}' of study '{study.study_name}' was run with another config "
                              f"({differences(old, flat)}): give the changed choice a new name, or set sweep.study_name "
                              "to start a new study")


# ------------------------------------------------------------------------------------------------
# trials and their records
# ------------------------------------------------------------------------------------------------


def owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def record_of(trial: Any) -> TrialRecord:
    """The record of a live ``optuna.Trial`` or a ``FrozenTrial``."""
    attrs = trial.user_attrs
    return TrialRecord.from_attrs(attrs) or TrialRecord()


def save_record(trial: Any, rec: TrialRecord) -> None:
    trial.set_user_attr(RECORD, rec.to_attr())


def read_trials(study: Any) -> list[TrialView]:
    out = []
    for t in study.get_trials(deepcopy=False):
        out.append(TrialView(number=t.number, state=t.state.name, value=t.value if t.state.name == "COMPLETE" else None,
                             params=dict(t.params), started=_ts(t.datetime_start), finished=_ts(t.datetime_complete),
                             record=TrialRecord.from_attrs(t.user_attrs) or TrialRecord()))
    return out


def _ts(d: Optional[datetime]) -> Optional[float]:
    return d.timestamp() if d is not None else None


def tell(study: Any, trial: Any, state: str, value: Optional[float] = None) -> None:
    from optuna.trial import TrialState

    if state == "COMPLETE":
        study.tell(trial, value)
    else:
        study.tell(trial, state=TrialState[state])


def enqueue_missing(study: Any, cells: list[Any]) -> int:
    """Enqueue each grid cell (and seed) with no COMPLETE, RUNNING or WAITING trial; returns how many.
    Grid trials carry their cell in their record, not as Optuna parameters: seeds and cells can be
    added to a study (Optuna's parameter distributions cannot change)."""
    from optuna.trial import TrialState

    live = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)
    have = {record_of(t).key for t in study.get_trials(deepcopy=False, states=live)}
    n = 0
    for c in cells:
        if c.key not in have:
            rec = TrialRecord(cell=c.label, choices=c.choices, seeds=[c.seed], key=c.key)
            study.enqueue_trial({}, user_attrs={RECORD: rec.to_attr()})
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


def fresh_record(study: Any, trial: Any) -> TrialRecord:
    """The record as stored now (a claimed trial's attributes come from the storage)."""
    return TrialRecord.from_attrs(study._storage.get_trial(trial._trial_id).user_attrs) or TrialRecord()


def duplicate_of(study: Any, trial: Any, key: str) -> int | None:
    """Planners racing at start-up may enqueue one cell twice: the lowest-numbered live (or a
    complete) trial of the key runs, the other is dropped. Returns the trial it duplicates."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False):
        if t.number == trial.number or record_of(t).key != key:
            continue
        if t.state == TrialState.COMPLETE or (t.state in (TrialState.RUNNING, TrialState.WAITING) and t.number < trial.number):
            return t.number
    return None


def same_params_as(study: Any, trial: Any) -> int | None:
    """TPE: another trial that is running or has run with exactly this trial's parameters. Each
    worker writes its parameters before it checks, so of two workers that drew the same parameters
    the one that checks second sees the other: the parameters are never evaluated twice at once."""
    from optuna.trial import TrialState

    mine = study._storage.get_trial(trial._trial_id).params
    states = (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)
    for t in study.get_trials(deepcopy=False, states=states):
        if t.number != trial.number and t.params == mine:
            return t.number
    return None


def reseed(study: Any, sw: SweepConfig, trial: Any) -> None:
    """TPE: a sampler seeded from (sampler_seed, trial number) for this trial's suggestions, so
    parallel workers (and re-runs) draw from different streams; reproducible from the seed."""
    study.sampler = _sampler(sw, seed=(sw.sampler_seed * 1_000_003 + trial.number) % 2**32)


def _owner_dead(who: str | None) -> bool:
    """True when the trial's worker ran on this machine and its process is gone."""
    if not who or ":" not in who:
        return False
    host, pid = who.rsplit(":", 1)
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


def _fail(study: Any, t: Any, rec: TrialRecord) -> None:
    from optuna.trial import TrialState

    study._storage.set_trial_user_attr(t._trial_id, RECORD, rec.to_attr())
    study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)


def fail_stale(study: Any, mine: bool = False) -> list[tuple[int, TrialRecord]]:
    """Trials left RUNNING by a killed worker of this machine (or, on RDB storage, whose heartbeat
    stopped; with ``mine``, also by this process) become FAIL, so the planner enqueues them again.
    Returns (number, record) of each."""
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
        rec = record_of(t)
        if t.number in before and t.state == TrialState.FAIL:
            stale.append((t, rec))
        elif t.state == TrialState.RUNNING and (_owner_dead(rec.owner) or (mine and rec.owner == owner())):
            rec.error = rec.error or ("the sweep stopped while it ran" if rec.owner == owner() else "worker process died (killed?)")
            _fail(study, t, rec)
            stale.append((t, rec))
    return [(t.number, rec) for t, rec in stale]


def drop_waiting(study: Any, keep: set[str], reason: str) -> int:
    """WAITING trials whose key is not in ``keep`` become FAIL with ``reason`` (not run): a study is
    never left with work nobody will claim. Returns how many."""
    from optuna.trial import TrialState

    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        rec = record_of(t)
        if rec.key in keep:
            continue
        rec.not_run = reason
        try:
            _fail(study, t, rec)
            n += 1
        except Exception:  # noqa: BLE001 - claimed meanwhile by another worker: theirs now
            pass
    return n


def others_running(study: Any) -> bool:
    from optuna.trial import TrialState

    return any(not _owner_dead(record_of(t).owner) for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


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


def get_attr(study: Any, key: str) -> Any:
    """A study attribute as stored now (another worker may have set it after this study was opened)."""
    return study._storage.get_study_user_attrs(study._study_id).get(key)


def set_attr(study: Any, key: str, value: Any) -> None:
    study.set_user_attr(key, value)


def count_trials(study: Any, *states: str) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=tuple(TrialState[s] for s in states)))
