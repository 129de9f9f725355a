"""Workers: claim grid cells (or ask TPE for trials) and train them; several worker processes on
one machine, or on many sharing a database storage.

Stopping: the command's process forwards Ctrl-C / SIGTERM once to each worker (workers run in
their own process group, so a terminal's Ctrl-C reaches only the command); a worker's trainer then
finishes its step, writes a checkpoint and stops, the trial is recorded FAIL ("interrupted") and the
next run of the command trains that cell on from its checkpoint (same run directory). A second
signal stops the workers at once.
"""
from __future__ import annotations

import copy
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

from core.errors import ConfigError
from core.sweep import runs
from core.sweep import study as st
from core.sweep.record import TrialRecord
from core.sweep.space import Choices, SweepConfig, _active, cell_label, pool, validate_cell

INTERRUPTED = "interrupted"
MAX_REPEATS = 20  # TPE suggestions in a row that repeat tried parameters before a worker gives up


def _setup(raw: dict[str, Any], threads: int | None) -> tuple[Any, SweepConfig, Any, str | None]:
    """A worker's (experiment, sweep config, study, MLflow parent run id), torch threads set."""
    import torch

    from core.config import validate

    if threads:
        torch.set_num_threads(threads)
    exp = validate(raw)
    study = st.open_study(exp, exp.sweep)
    return exp, exp.sweep, study, study.user_attrs.get(st.PARENT_RUN)


def cell_raw(raw: dict[str, Any], exp: Any, study: Any, trial_dir: str | None = None) -> dict[str, Any]:
    """The base config with its runs under ``<out_dir>/<study>[/<trial_dir>]``: two studies never
    share a run directory, nor (TPE) two trials; a grid cell's re-run finds its own checkpoints."""
    from core.config import set_dotted

    data = copy.deepcopy(raw)
    out = Path(exp.train.out_dir) / study.study_name
    set_dotted(data, ["train", "out_dir"], str(out / trial_dir if trial_dir else out))
    return data


def run_cell(exp: Any, choices: dict[str, Any], seed: int, trial: Any, rec: TrialRecord, parent_id: str | None,
             on_eval: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, float]:
    """Build and train one cell at one seed; raises on failure (after its MLflow run is marked FAILED)."""
    from core.tracking import Tracker
    from core.rundir import run_dir_for
    from core.trainer import build, train

    label = cell_label(choices)
    tags = {"vtok.sweep": "child", "vtok.cell": label, "vtok.seed": str(seed), "vtok.trial": str(trial.number),
            "vtok.study": trial.study.study_name, **runs.choice_params(choices)}
    params = runs.choice_params(choices)
    rec.run_dirs[seed] = str(run_dir_for(exp).resolve())
    st.save_record(trial, rec)

    def on_start(run_id: str | None) -> None:
        if run_id:
            rec.run_ids[seed] = run_id
            st.save_record(trial, rec)

    tracker = runs.cell_tracker(exp, params, f"{label} seed {seed}", on_start) if exp.tracking.enabled else Tracker()
    try:
        built = build(exp)
        check_stop()  # a stop asked for while building: the trainer's own handler is not yet in place
        result = train(exp, built=built, parent_run_id=parent_id, tags=tags, on_eval=on_eval, tracker=tracker)
    except BaseException as e:
        runs.record_failure(exp, tracker, tags, params, parent_id, f"{label} seed {seed}", e)
        raise
    return result.metrics


def run_trial(study: Any, trial: Any, rec: TrialRecord, raw: dict[str, Any], sw: SweepConfig, parent_id: str | None,
              prune: bool) -> str:
    """Run a trial's cell over its seeds; tell the study COMPLETE (mean objective), PRUNED or FAIL.
    ``raw`` is the base config with the trial's output directory (``cell_raw``)."""
    import optuna

    values = []
    try:
        for i, seed in enumerate(rec.seeds):
            check_stop()
            cell_exp = validate_cell(raw, sw, rec.choices, seed)
            cell_exp.train.progress = False  # the sweep's own bar (core.progress) shows progress
            print(f"vtok sweep: trial {trial.number} cell {rec.cell} seed {seed}", file=sys.stderr)
            on_eval = _pruning(trial, sw) if prune and i == 0 else None
            metrics = run_cell(cell_exp, rec.choices, seed, trial, rec, parent_id, on_eval)
            if sw.objective.metric not in metrics:
                raise ConfigError("sweep.objective.metric", f"'{sw.objective.metric}' is not among the cell's metrics "
                                  f"({', '.join(sorted(metrics)) or 'none'}): add its evaluator to eval")
            rec.metrics[seed] = metrics
            st.save_record(trial, rec)
            values.append(metrics[sw.objective.metric])
    except optuna.TrialPruned as e:
        rec.error = f"pruned: {e}"
        st.save_record(trial, rec)
        st.tell(study, trial, "PRUNED")
        return "PRUNED"
    except KeyboardInterrupt:
        rec.error = INTERRUPTED
        st.save_record(trial, rec)
        st.tell(study, trial, "FAIL")
        raise
    except Exception as e:
        print(f"vtok sweep: cell {rec.cell} FAILED: {runs.error_text(e)}", file=sys.stderr)
        if os.environ.get("VTOK_DEBUG"):
            traceback.print_exc()
        rec.error = runs.error_text(e)
        st.save_record(trial, rec)
        st.tell(study, trial, "FAIL")
        return "FAIL"
    st.tell(study, trial, "COMPLETE", sum(values) / len(values))
    return "COMPLETE"


def _pruning(trial: Any, sw: SweepConfig) -> Callable[[int, dict[str, float]], None]:
    import optuna

    def on_eval(step: int, metrics: dict[str, float]) -> None:
        if sw.objective.metric in metrics:
            trial.report(metrics[sw.objective.metric], step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"at step {step}")

    return on_eval


def _drop(study: Any, trial: Any, rec: TrialRecord, why: str) -> None:
    rec.not_run = why
    st.save_record(trial, rec)
    st.tell(study, trial, "FAIL")


def grid_worker(raw: dict[str, Any], threads: int | None = None) -> int:
    """Claim and run WAITING cells until none is left. Returns the number of failed cells."""
    exp, sw, study, parent_id = _setup(raw, threads)
    keys = {c.key for c in pool(sw)}  # a seed range: seeds the planner may add
    base = cell_raw(raw, exp, study)
    failed = 0
    while not check_stop() and (trial := st.claim(study)) is not None:
        rec = st.fresh_record(study, trial)
        rec.owner = st.owner()
        st.save_record(trial, rec)
        if rec.key not in keys:
            _drop(study, trial, rec, "not in this command's plan (its cells or seeds differ)")
            continue
        dup = st.duplicate_of(study, trial, rec.key)
        if dup is not None:
            _drop(study, trial, rec, f"duplicate of trial {dup} (planners raced)")
            continue
        with st.heartbeat(study, trial):
            failed += run_trial(study, trial, rec, base, sw, parent_id, prune=False) == "FAIL"
    return failed


def tpe_worker(raw: dict[str, Any], threads: int | None = None) -> int:
    """Ask TPE for trials until ``n_trials`` COMPLETE, PRUNED or RUNNING exist (workers starting at
    the same moment may overshoot by one each); each trial runs every seed. Each trial draws from
    its own seeded stream (``study.reseed``), running trials count as bad results for the next draw
    (constant liar), and a trial whose parameters another trial runs or ran is dropped unrun."""
    exp, sw, study, parent_id = _setup(raw, threads)
    failed = repeats = 0
    while st.count_trials(study, "COMPLETE", "PRUNED", "RUNNING") < sw.n_trials:
        check_stop()
        trial = study.ask()
        st.reseed(study, sw, trial)
        choices = suggest(trial, sw)
        rec = TrialRecord(cell=cell_label(choices), choices=choices, seeds=list(sw.seeds), owner=st.owner())
        st.save_record(trial, rec)
        same = st.same_params_as(study, trial)
        if same is not None:
            _drop(study, trial, rec, f"same parameters as trial {same}")
            repeats += 1
            if repeats >= MAX_REPEATS:
                print(f"vtok sweep: {MAX_REPEATS} suggestions in a row repeated tried parameters: the space looks "
                      "exhausted; stopping this worker", file=sys.stderr)
                break
            continue
        repeats = 0
        base = cell_raw(raw, exp, study, f"trial-{trial.number}")
        with st.heartbeat(study, trial):
            state = run_trial(study, trial, rec, base, sw, parent_id, prune=sw.pruning is not None)
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
# processes and signals
# ------------------------------------------------------------------------------------------------


_stop: list[int] = []  # signals received by this process (outside the trainer's own handler)


def _on_signal(signum: int, frame: Any) -> None:
    """First Ctrl-C / SIGTERM: stop before the next cell (or, in training, the trainer's handler
    checkpoints and stops); a second one stops at once."""
    if _stop:
        raise KeyboardInterrupt
    _stop.append(signum)


def check_stop() -> None:
    if _stop:
        raise KeyboardInterrupt


def _stop_with_parent(parent: int) -> None:
    """A worker is in its own process group, so killing the command's group (``kill -9 -PGID``, a
    closed session) would leave it training alone, claiming trials nobody plans for. On Linux the
    kernel sends it SIGTERM when the command dies (``prctl(PR_SET_PDEATHSIG)``): it stops as on
    Ctrl-C (checkpoint, run KILLED, trial failed for the next command to resume). A parent that
    died before the call is caught by comparing ``getppid``."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # no prctl: the command's own signal forwarding remains
            pass
    if os.getppid() != parent:
        _stop.append(int(signal.SIGTERM))


def _process_main(sampler: str, raw: dict[str, Any], threads: int | None, results: Any, parent: int = 0) -> None:
    """A worker process: its own process group (a terminal's Ctrl-C goes to the command only, which
    asks each worker once), SIGINT / SIGTERM stop it cleanly, one result put on ``results``."""
    os.setpgrp()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _on_signal)
    _stop_with_parent(parent)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    target = grid_worker if sampler == "grid" else tpe_worker
    try:
        results.put(("done", target(raw, threads)))
    except KeyboardInterrupt:
        results.put((INTERRUPTED, 0))
    except BaseException as e:  # noqa: BLE001 - reported by the command, in one line
        if os.environ.get("VTOK_DEBUG"):
            traceback.print_exc()
        results.put(("error", runs.error_text(e)))


def run_workers(raw: dict[str, Any], sw: SweepConfig) -> tuple[int, bool, list[str]]:
    """Run the workers to the end: (failed cells, interrupted, worker errors)."""
    if sw.workers == 1:  # in this process: torch's thread count is the caller's unless set here
        import torch

        before = torch.get_num_threads()
        old = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        _stop.clear()
        try:
            target = grid_worker if sw.sampler == "grid" else tpe_worker
            return target(raw, sw.threads_per_worker), False, []
        except KeyboardInterrupt:
            return 0, True, []
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
            _stop.clear()
            torch.set_num_threads(before)
    # small models on a busy CPU lose badly to oversubscription (measured 6x slower per step with
    # 2 threads on 2 loaded cores): split the cores between the workers
    threads = sw.threads_per_worker or max(1, (os.cpu_count() or 1) // sw.workers)
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # fresh interpreters: no forked torch thread pools
    results = ctx.SimpleQueue()
    signals = {signal.SIGINT, signal.SIGTERM}
    procs: list[Any] = []
    asked = []

    def forward(signum: int, frame: Any) -> None:
        asked.append(signum)
        for p in procs:
            if p.pid and p.exitcode is None:
                try:
                    os.kill(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    old = {sig: signal.signal(sig, forward) for sig in signals}
    # started with the signals blocked (the mask survives exec): a worker unblocks them once it is
    # in its own process group, so a Ctrl-C during its start-up is not lost nor seen twice
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        for _ in range(sw.workers):
            p = ctx.Process(target=_process_main, args=(sw.sampler, raw, threads, results, os.getpid()))
            p.start()
            procs.append(p)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
    try:
        for p in procs:
            while p.exitcode is None:
                p.join(0.2)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    out = []
    while not results.empty():
        out.append(results.get())
    failed = sum(v for kind, v in out if kind == "done")
    errors = [v for kind, v in out if kind == "error"]
    errors += [f"worker exited with status {p.exitcode} without a result" for p in procs][: len(procs) - len(out)]
    interrupted = bool(asked) or any(kind == INTERRUPTED for kind, _ in out)
    return failed, interrupted, errors
