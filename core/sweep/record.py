"""The typed record each trial of a study carries (one Optuna user attribute, ``vtok.record``).

Written by the planner (grid: which cell and seed the trial is), by the worker that runs it (owner,
MLflow runs, run directories, per-seed final metrics, error) and read by ``core.report``: nothing
else reads or writes trial attributes by string key.
"""
from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

RECORD = "vtok.record"  # the trial user attribute holding a TrialRecord


class TrialRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    cell: str = ""  # cell label, e.g. ``rq/2`` (tpe: the suggested values' label)
    choices: dict[str, Any] = Field(default_factory=dict)  # space key -> choice name or value
    seeds: list[int] = Field(default_factory=list)  # grid: one seed; tpe: every seed of the trial
    key: str = ""  # grid: ``<cell>#seed=<k>``, the unit of work that runs once
    owner: str = ""  # host:pid of the worker that ran it
    metrics: dict[int, dict[str, float]] = Field(default_factory=dict)  # seed -> final metrics
    run_ids: dict[int, str] = Field(default_factory=dict)  # seed -> MLflow child run id
    run_dirs: dict[int, str] = Field(default_factory=dict)  # seed -> run directory
    error: str = ""  # why it failed (FAIL) or was pruned
    not_run: str = ""  # set when the trial was dropped without running (duplicate, stopped, ...)

    def to_attr(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> Optional["TrialRecord"]:
        raw = attrs.get(RECORD)
        return cls.model_validate(raw) if isinstance(raw, dict) else None


class TrialView(BaseModel):
    """What the report needs of one trial: its state, timing, objective value and record."""

    number: int
    state: str  # COMPLETE, FAIL, PRUNED, RUNNING, WAITING
    value: Optional[float] = None
    params: dict[str, Any] = Field(default_factory=dict)
    started: Optional[float] = None  # POSIX seconds
    finished: Optional[float] = None
    record: TrialRecord = Field(default_factory=TrialRecord)
