"""MLflow: the sweep's parent run (shared by every worker and re-run through a study attribute)
and one child run per cell and seed, named ``<cell>-seed<k>`` with the cell's choices as params."""
from __future__ import annotations

import sys
import time
from typing import Any

from core.sweep import study as st
from core.sweep.space import SweepConfig, _name


def parent_run(exp: Any, sw: SweepConfig, study: Any, planned: int) -> str | None:
    if not exp.tracking.enabled:
        return None
    from core.tracking import MlflowTracker

    existing = study.user_attrs.get(st.PARENT_RUN)
    tracker = MlflowTracker(exp.tracking.uri, exp.tracking.experiment or exp.name)
    if existing:
        try:
            tracker.client.update_run(existing, status="RUNNING")
            return existing
        except Exception:  # deleted from MLflow: start a new one
            pass
    storage = st.display_storage(sw.storage_url())
    tags = {"vtok.sweep": "parent", "vtok.study": study.study_name, "vtok.storage": storage,
            "vtok.sampler": sw.sampler, "vtok.objective": f"{sw.objective.direction} {sw.objective.metric}",
            "vtok.planned_runs": str(planned)}
    if exp.paper is not None and exp.paper.source:
        tags["vtok.paper"] = exp.paper.source
    params = {"sweep.sampler": sw.sampler, "sweep.seeds": sw.seeds, "sweep.keys": ",".join(sw.space),
              "sweep.study": study.study_name, "sweep.storage": storage}
    run_id = tracker.start(f"{study.study_name} (sweep)", params, tags)
    st.set_attr(study, st.PARENT_RUN, run_id)
    time.sleep(0.05)
    winner = st.get_attr(study, st.PARENT_RUN)
    if winner and winner != run_id:  # another worker created one at the same moment: use theirs
        tracker.client.delete_run(run_id)
        return winner
    return run_id


def finish_parent(exp: Any, study: Any, keys: list[str] | None) -> None:
    """Count the finished runs on the parent; close it unless another worker is still going:
    FINISHED when every planned key (grid) completed, else FAILED."""
    run_id = study.user_attrs.get(st.PARENT_RUN) or st.get_attr(study, st.PARENT_RUN)
    if not run_id or not exp.tracking.enabled:
        return
    from mlflow.tracking import MlflowClient

    from core.tracking import resolve_uri

    trials = st.read_trials(study)
    done = {t.record.key for t in trials if t.state == "COMPLETE"}
    busy = any(t.state in ("RUNNING", "WAITING") for t in trials)
    client = MlflowClient(tracking_uri=resolve_uri(exp.tracking.uri))
    client.set_tag(run_id, "vtok.completed_runs", str(sum(t.state == "COMPLETE" for t in trials)))
    if busy:
        return
    ok = all(k in done for k in keys) if keys is not None else not any(t.state == "FAIL" and not t.record.not_run for t in trials)
    client.set_terminated(run_id, "FINISHED" if ok else "FAILED")


def close_runs(run_ids: list[str | None], tracking: Any, status: str = "KILLED", parent_id: str | None = None,
               trials: set[str] = frozenset()) -> None:
    """Close RUNNING MLflow runs (of dead trials, or the parent). A worker killed between creating its
    run and recording the run id on the trial leaves a run the trial does not name: those are found
    as the parent's RUNNING children tagged with a dead trial's number."""
    if tracking is None or not tracking.enabled:
        return
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
                client.set_terminated(rid, status)
        except Exception as e:  # noqa: BLE001 - a run deleted by hand, another store
            print(f"vtok sweep: could not close MLflow run {rid}: {e}", file=sys.stderr)


def cell_tracker(exp: Any, extra_params: dict[str, Any], run_name: str, on_start: Any = None) -> Any:
    """The trainer's MLflow tracker with run name ``<cell>-seed<k>`` and the cell's choices as params
    (``sweep.<key>``), so the MLflow compare view lines cells up; ``on_start(run_id)`` is called as
    soon as the run exists (so a re-run can close the run of a worker that was killed)."""
    from core.tracking import MlflowTracker

    class _Tracker(MlflowTracker):
        def start(self, _run_name, params, tags, run_id=None, parent_run_id=None):
            rid = super().start(run_name, {**params, **extra_params}, tags, run_id=run_id, parent_run_id=parent_run_id)
            if on_start is not None:
                on_start(rid)
            return rid

    return _Tracker(exp.tracking.uri, exp.tracking.experiment or exp.name, exp.tracking.flush_every)


def record_failure(exp: Any, tracker: Any, tags: dict[str, str], params: dict[str, Any], parent_id: str | None,
                   run_name: str, e: BaseException) -> None:
    import optuna

    if isinstance(e, KeyboardInterrupt) or not exp.tracking.enabled:
        return
    if isinstance(e, optuna.TrialPruned):
        if tracker.run_id is not None:
            tracker.set_tags({"vtok.pruned": str(e)})
        return
    err = error_text(e)
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


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:4000]


def choice_params(choices: dict[str, Any]) -> dict[str, str]:
    return {f"sweep.{k}": _name(v) for k, v in choices.items()}
