"""MLflow tracking: params, buffered metrics, images, artifacts, tags and an honest final status.

Talks to MLflow through ``MlflowClient`` with explicit run ids (no global "active run"), so sweeps,
nested runs and several runs in one process cannot mix. ``mlflow`` is imported lazily: ``--help``,
``--list-plugins`` and ``--dry-run`` never pay for it. Step metrics are buffered and written with
``log_batch`` (one SQLite transaction per batch instead of ~20 ms per ``log_metric``).
"""
from __future__ import annotations

import json
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
    if uri.startswith("file:") or "://" not in uri and ":" not in uri[2:]:
        # a directory store is documented as accepted; MLflow 3 refuses it unless opted in
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
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


def git_dirty() -> bool | None:
    """True when the vtok checkout has uncommitted changes to tracked files (None: not a git checkout)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).resolve().parent)
        return bool(out.stdout.strip()) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def git_tags() -> dict[str, str]:
    """``vtok.git_sha`` (and MLflow's own ``mlflow.source.git.commit``, shown on the run page) and
    ``vtok.git_dirty`` ("true" when the code that ran differs from that commit)."""
    sha = git_sha()
    if not sha:
        return {}
    tags = {"vtok.git_sha": sha, "mlflow.source.git.commit": sha}
    dirty = git_dirty()
    if dirty is not None:
        tags["vtok.git_dirty"] = "true" if dirty else "false"
    return tags


# ------------------------------------------------------------------------------------------------
# what a researcher reads in the UI: names, plain param values, where to look
# ------------------------------------------------------------------------------------------------

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # MLflow 3 opens GenAI pages unless the kind says otherwise
EXPERIMENT_KIND = "custom_model_development"
MAX_NAME_LEN = 120


def param_value(v: Any) -> str:
    """A param as people write it in YAML: ``null``, ``true``/``false``, ``[0.9, 0.95]``; not Python reprs."""
    if isinstance(v, str):
        return v
    return json.dumps(v, separators=(", ", ": "))


# overrides that do not change what a run computes are left out of its name
_NOT_IN_NAME = ("tracking.", "train.progress", "train.resume", "train.out_dir", "train.device", "train.num_workers",
                "train.log_every", "train.eval_every", "train.ckpt_every", "train.keep_checkpoints", "train.eval_batch_size")
_NAME_ORDER = ("model.", "losses", "data.", "train.", "eval")  # what the run is, first


def override_label(overrides: list[str]) -> str:
    """``train.steps=300 model.quantizer.codebook_size=256`` -> ``codebook_size=256 steps=300``: the
    overrides that change the computation, the model's first, each key by its last component (or
    as many trailing components as tell it apart)."""
    kept = [o for o in overrides if not o.strip().startswith(_NOT_IN_NAME)]

    def rank(o: str) -> int:
        return next((i for i, p in enumerate(_NAME_ORDER) if o.strip().startswith(p)), len(_NAME_ORDER))

    kept.sort(key=rank)  # stable: the command line's order within a group
    pairs = [o.split("=", 1) if "=" in o else [o, ""] for o in kept]
    keys = [k.strip().split(".") for k, _ in pairs]
    names = []
    for i, parts in enumerate(keys):
        n = 1
        while n < len(parts) and any(j != i and other[-n:] == parts[-n:] for j, other in enumerate(keys)):
            n += 1
        names.append(".".join(parts[-n:]))
    return " ".join(f"{name}={v.strip()}" for name, (_, v) in zip(names, pairs))


def run_name(experiment: str, overrides: list[str] | None = None) -> str:
    """The MLflow run name of a single run: the experiment and what the command line changed."""
    label = override_label(overrides or [])
    name = f"{experiment} {label}".strip()
    return name if len(name) <= MAX_NAME_LEN else name[: MAX_NAME_LEN - 1] + "…"


def runs_table_url(base: str, experiment_id: str) -> str:
    """The runs table of one experiment in MLflow 3's "Model training" view (it would otherwise land
    on its GenAI pages; the UI reads ``workflowType`` from the address)."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def ui_hint(uri: str | None, experiment_id: str | None = None, run_id: str | None = None) -> str:
    """How to look at results: the ``mlflow ui`` command for a local store (the URI that was used,
    ``MLFLOW_TRACKING_URI`` included) or the server's address, and the runs table of the experiment
    (found from ``run_id`` when not given)."""
    uri = resolve_uri(uri)
    if experiment_id is None and run_id is not None:
        try:
            from mlflow.tracking import MlflowClient

            experiment_id = MlflowClient(tracking_uri=uri).get_run(run_id).info.experiment_id
        except Exception:  # noqa: BLE001 - a hint must never fail the command
            experiment_id = None
    if uri.startswith(("http://", "https://")):
        base, cmd = uri, ""
    else:
        base = "http://127.0.0.1:5000"
        cmd = f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000, then open "
    return cmd + (runs_table_url(base, experiment_id) if experiment_id else base)


def ensure_experiment(client: Any, name: str) -> str:
    """The experiment's id, creating it; tagged as a model-development experiment so the MLflow 3
    UI opens its runs table, not the GenAI traces pages."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except Exception:  # another worker created it first
            exp = client.get_experiment_by_name(name)
    if exp.tags.get(EXPERIMENT_KIND_TAG) is None:
        try:
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        except Exception:  # noqa: BLE001 - a read-only store: the UI still works, one click further
            pass
    return exp.experiment_id


def log_summary(client: Any, run_id: str, values: dict[str, dict[str, list[float]]], metrics: list[str] | None = None,
                order: list[str] | None = None) -> int:
    """Per-cell means over seeds on a sweep's parent run: ``cells/<metric>`` at step i for the i-th
    cell (one chart per metric across the cells, in the report's order; the tag ``vtok.cell_steps``
    says which step is which cell) and the seed counts as ``cells/seeds``. Returns how many points."""
    from mlflow.entities import Metric, RunTag

    cells = [c for c in (order or []) if c in values] + [c for c in values if c not in (order or [])]
    ts = int(time.time() * 1000)
    rows = []
    for i, cell in enumerate(cells):
        for m, seeds in values[cell].items():
            seeds = list(seeds.values()) if isinstance(seeds, dict) else seeds  # {seed: value}
            if metrics is not None and m not in metrics or not seeds:
                continue
            rows.append(Metric(f"cells/{_metric_key(m)}", sum(seeds) / len(seeds), ts, i))
        rows.append(Metric("cells/seeds", float(max((len(v) for v in values[cell].values()), default=0)), ts, i))
    for i in range(0, len(rows), BATCH):
        client.log_batch(run_id, metrics=rows[i : i + BATCH])
    mapping = ", ".join(f"{i}: {c}" for i, c in enumerate(cells))
    client.log_batch(run_id, tags=[RunTag("vtok.cell_steps", mapping[:5000])])
    return len(rows)


def _metric_key(name: str) -> str:
    """MLflow keys allow letters, digits, ``_ - . space : /``: anything else becomes ``_``."""
    return "".join(c if c.isalnum() or c in "_-. :/" else "_" for c in name)


class Tracker:
    """No-op tracker (tracking disabled, or a non-zero rank)."""

    run_id: str | None = None
    experiment_id: str | None = None

    def start(self, run_name: str, params: dict[str, Any], tags: dict[str, str], run_id: str | None = None,
              parent_run_id: str | None = None) -> str | None:
        return None

    def log_params(self, params: dict[str, Any]) -> None: ...
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
        self.experiment_id: str | None = None

    def _experiment_id(self) -> str:
        return ensure_experiment(self.client, self.experiment)

    def start(self, run_name, params, tags, run_id=None, parent_run_id=None):
        from mlflow.entities import RunStatus

        if run_id is not None:  # resuming: the same MLflow run goes on
            self.run_id = run_id
            self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            self.experiment_id = self.client.get_run(run_id).info.experiment_id
            return run_id
        all_tags = dict(tags)
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self._experiment_id(), run_name=run_name, tags=all_tags)
        self.run_id = run.info.run_id
        self.experiment_id = run.info.experiment_id
        self.log_params(params)
        return self.run_id

    def log_params(self, params):
        from mlflow.entities import Param

        items = [Param(k, param_value(v)[:MAX_PARAM_LEN]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

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
