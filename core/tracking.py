"""MLflow tracking: params, buffered metrics, images, artifacts, tags and an honest final status.

Talks to MLflow through ``MlflowClient`` with explicit run ids (no global "active run"), so sweeps,
nested runs and several runs in one process cannot mix. ``mlflow`` is imported lazily: ``--help``,
``--list-plugins`` and ``--dry-run`` never pay for it. Step metrics are buffered and written with
``log_batch`` (one SQLite transaction per batch instead of ~20 ms per ``log_metric``).
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

DEFAULT_URI = "sqlite:///mlflow.db"
MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
BATCH = 1000  # MLflow's limit on metrics per log_batch call


def resolve_uri(uri: str | None) -> str:
    """The tracking URI; a relative SQLite path is made absolute (MLflow caches stores by URI, so a
    relative one would keep pointing at the first working directory of the process)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/") and ":memory:" not in uri:
        uri = prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


class Tracker:
    """No-op tracker (tracking disabled, or a non-zero rank)."""

    run_id: str | None = None

    def start(self, run_name: str, params: dict[str, Any], tags: dict[str, str], run_id: str | None = None,
              parent_run_id: str | None = None) -> str | None:
        return None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def flush(self) -> None: ...
    def end(self, status: str = "FINISHED") -> None: ...


class MlflowTracker(Tracker):
    """One MLflow run; ``end`` sets FINISHED / FAILED / KILLED (never leaves it RUNNING)."""

    def __init__(self, uri: str | None, experiment: str, flush_every: int = 100) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = resolve_uri(uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment = experiment
        self.flush_every = flush_every
        self.buffer: list[Any] = []
        self.run_id = None

    def _experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(self.experiment)
        except Exception:  # another worker created it first
            return self.client.get_experiment_by_name(self.experiment).experiment_id

    def start(self, run_name, params, tags, run_id=None, parent_run_id=None):
        from mlflow.entities import Param, RunStatus

        if run_id is not None:  # resuming: the same MLflow run goes on
            self.run_id = run_id
            self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            return run_id
        all_tags = dict(tags)
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self._experiment_id(), run_name=run_name, tags=all_tags)
        self.run_id = run.info.run_id
        items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])
        return self.run_id

    def log_metrics(self, metrics, step):
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.buffer += [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        if len(self.buffer) >= self.flush_every:
            self.flush()

    def flush(self):
        while self.buffer:
            chunk, self.buffer = self.buffer[:BATCH], self.buffer[BATCH:]
            self.client.log_batch(self.run_id, metrics=chunk)

    def log_artifact(self, path, artifact_path=None):
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags):
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def end(self, status="FINISHED"):
        if self.run_id is None:
            return
        try:
            self.flush()
        finally:
            self.client.set_terminated(self.run_id, status)


def make_tracker(cfg: Any, experiment: str, enabled: bool = True) -> Tracker:
    if not (enabled and cfg.enabled):
        return Tracker()
    return MlflowTracker(cfg.uri, cfg.experiment or experiment, cfg.flush_every)


# ---- checking a tracking URI before anything is written -------------------------------------------

_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
_SCHEMES = ("file", "http", "https", "databricks", "databricks-uc", "uc", *_DB_SCHEMES)


def check_uri(uri: str | None, timeout: float = 3.0) -> None:
    """Raise ConfigError (naming ``tracking.uri`` or ``MLFLOW_TRACKING_URI``) when the tracking store
    cannot work: an unknown scheme, a SQLite file in a directory that does not exist (or that is a
    directory itself), a local store path under a file, or a server that does not accept a
    connection within ``timeout`` seconds (fail fast instead of MLflow's minutes of retries)."""
    import socket
    from urllib.parse import urlsplit

    from core.errors import ConfigError

    where = "tracking.uri" if uri else "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "tracking.uri"
    full = resolve_uri(uri)
    parts = urlsplit(full)
    scheme = parts.scheme.split("+")[0].lower()  # postgresql+psycopg2 -> postgresql
    if len(scheme) == 1 or not scheme:  # a plain (or Windows drive) path: MLflow's file store
        scheme, local = "file", full
    else:
        local = parts.path
    if scheme not in _SCHEMES:
        raise ConfigError(where, f"unknown tracking URI scheme '{parts.scheme}' in {full!r} (use sqlite:///FILE.db, "
                                 "http(s)://HOST:PORT, postgresql://..., or a directory path)")
    if scheme == "sqlite":
        if ":memory:" in full:
            return
        db = Path(full[len("sqlite:///"):]) if full.startswith("sqlite:///") else Path(local)
        if db.is_dir():
            raise ConfigError(where, f"{db} is a directory, not a SQLite database file")
        if not db.parent.is_dir():
            raise ConfigError(where, f"the directory of the SQLite database {db} does not exist")
        return
    if scheme == "file":
        p = Path(local)
        if p.exists() and not p.is_dir():
            raise ConfigError(where, f"{p} is a file; a file store is a directory")
        for parent in p.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise ConfigError(where, f"{p} lies under the file {parent}")
                break
        return
    if scheme in ("http", "https", *_DB_SCHEMES):
        host = parts.hostname
        if not host:
            raise ConfigError(where, f"no host in {full!r}")
        try:
            port = parts.port or {"http": 80, "https": 443, "postgresql": 5432, "mysql": 3306, "mssql": 1433}[scheme]
        except ValueError:
            raise ConfigError(where, f"invalid port in {full!r}") from None
        try:
            with socket.create_connection((host, port), timeout=timeout):
                pass
        except OSError as e:
            raise ConfigError(where, f"cannot reach the tracking server {host}:{port} ({e.strerror or type(e).__name__}); "
                                     "start it or set tracking.enabled=false") from None
        if scheme in ("http", "https"):  # a port that accepts but never answers would hang MLflow for minutes
            import urllib.error
            import urllib.request

            try:
                urllib.request.urlopen(f"{parts.scheme}://{parts.netloc}/health", timeout=timeout).close()
            except urllib.error.HTTPError:
                pass  # it answers: an HTTP server (a proxy path may 404 on /health)
            except (OSError, ValueError) as e:
                raise ConfigError(where, f"the tracking server {host}:{port} does not answer HTTP within {timeout:g} s "
                                         f"({type(e).__name__}); start it or set tracking.enabled=false") from None
